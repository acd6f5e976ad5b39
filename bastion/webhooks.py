"""Signed webhooks with an outbox: one implementation for every notification bastion sends.

Approvals (`bastion.approvals.webhooks`) and alerts (`bastion.signals.alert_webhooks`) each
keep their own outbox tables and body; this module sends them. Each body is a JSON object whose
``text`` a chat tool's incoming webhook (Slack, Mattermost, Teams) shows as it is, and whose
``event`` names what it tells of. The body is signed the way Stripe signs its webhooks: header
``Bastion-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`` (RFC 2104 HMAC,
FIPS 180-4 SHA-256) under the webhook's own secret; while its secret is rotated, a second
``v1`` under the previous one follows, so a receiver verifies with either (`sign`).

Delivery is at least once and survives restarts: `Outbox.enqueue` writes one row per webhook
to the outbox table (``<name>_outbox``) in the thread that asks and returns; a background task
on the server's event loop claims due rows under a lease, posts them, and records every attempt
(``<name>_deliveries``); a retry due later than the next sweep waits in the outbox, not in
memory. A process that stops or dies leaves its rows for the next one (or
another replica) to take once the lease ends. Receivers dedupe on the delivery id
(``Bastion-Delivery``, and signed in the body), the same across retries.

A receiver named by a DNS name is reached at public addresses only, its name resolved once at
each attempt and the connection made to the address checked (`bastion.egress.pinned`), unless
its ``allow_private_addresses`` allows more; unset, one named by a loopback or private address
may reach every one (`bastion.egress.metadata_allowance`). A refused address is a failed
attempt, recorded and retried as any other: whoever controls the receiver's DNS cannot point the
signed POST into bastion's network.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import httpx

from bastion.db import Database, DatabaseUnavailable, first_line, prune_rows
from bastion.egress import (
    AddressRefused,
    NameNotResolved,
    PrivateAllowance,
    cleartext_problem,
    metadata_allowance,
    pinned,
    private_allowance,
)
from bastion.names import readable
from bastion.retries import Outage
from bastion.tls import fetching_client

log = logging.getLogger("bastion.webhooks")

SIGNATURE_HEADER = "Bastion-Signature"
DELIVERY_HEADER = "Bastion-Delivery"
EVENT_HEADER = "Bastion-Event"
# A claimed delivery stays with its process this long past its next attempt's deadline; a
# process that died holds it no longer than that.
LEASE_MARGIN_SECONDS = 60.0
# How often the outbox is read for deliveries nobody holds (left by a stopped or dead process,
# or waiting for room in a full queue); a new request or a freed slot reads it at once.
SWEEP_SECONDS = 5.0
# No wait between two attempts is longer than this, whatever the backoff doubled to.
MAX_DELAY_SECONDS = 3600.0
# An identifier shown in a chat message is cut to this many characters.
_SHOWN_CHARS = 120
# An error recorded for an attempt is cut to this many characters.
_ERROR_CHARS = 300


@dataclass(frozen=True)
class Webhook:
    """One receiver. Its URL is a credential too (a chat tool's incoming-webhook URL lets whoever
    holds it post to the channel): records, logs and reprs show its `label` instead."""

    url: str = field(repr=False)
    secret: bytes = field(repr=False)
    # Plain http beyond the loopback (``allow_http = true``): the receiver is on a network the
    # operator trusts with the body (approval links, people's names) and the URL itself.
    allow_http: bool = False
    # While the secret is rotated: the one receivers may still verify with (also signed).
    previous_secret: bytes = field(default=b"", repr=False)
    # The non-public addresses its name may lead to (``allow_private_addresses``, read by
    # `bastion.egress.private_allowance`); None: as `bastion.egress.metadata_allowance` says
    # for its URL (every one if the URL names a loopback or private address, else none).
    allow_private_addresses: PrivateAllowance | None = None
    # The table it was configured in (``approvals.webhooks[0]``), for refusals: "" if none.
    where: str = field(default="", repr=False, compare=False)

    @property
    def label(self) -> str:
        return webhook_label(self.url)

    @property
    def private_addresses(self) -> PrivateAllowance:
        """The non-public addresses a delivery may connect to (`bastion.egress.pinned`)."""
        return metadata_allowance(self.url, self.allow_private_addresses)

    @property
    def private_setting(self) -> str:
        """The setting that allows more addresses, as a refusal names it."""
        if self.where:
            return f"{self.where}.allow_private_addresses"
        return "allow_private_addresses of this webhook"

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


class SettingsError(ValueError):
    """A webhook setting that cannot be used; the message names the key and what to write.
    The server reports it as a configuration error (`bastion.server.config.ConfigError`)."""


# A shorter signing secret could be guessed from one signed notification, offline.
MIN_SECRET_BYTES = 16


# The keys of one ``[[<table>.webhooks]]`` table.
WEBHOOK_KEYS = frozenset(
    {"url", "url_env", "secret_env", "previous_secret_env", "allow_http", "allow_private_addresses"}
)


def parse_webhook(where: str, hook: Any, env: dict[str, str], before: list[Webhook]) -> Webhook:
    """One ``[[<table>.webhooks]]`` table (``where`` names it in errors). Its URL may come from the environment as well as
    its secret: a chat tool's incoming-webhook URL is itself a credential (whoever has it can
    post to the channel)."""
    if not isinstance(hook, dict):
        raise SettingsError(f'{where}: needs url = "https://..." (or url_env) and secret_env')
    if "secret" in hook:
        raise SettingsError(
            f"{where}: the signing secret belongs in an environment variable named by"
            " secret_env, not in a file"
        )
    unknown = sorted(set(hook) - WEBHOOK_KEYS)
    if unknown:
        raise SettingsError(
            f"{where}: unknown key {unknown[0]}; known keys: {', '.join(sorted(WEBHOOK_KEYS))}"
        )
    if ("url" in hook) == ("url_env" in hook):
        raise SettingsError(f'{where}: needs url = "https://..." or url_env, one of the two')
    if "url_env" in hook:
        name = hook["url_env"]
        if not isinstance(name, str) or not env.get(name):
            raise SettingsError(
                f"{where}.url_env must name an environment variable that holds the webhook's"
                f" URL ({name!r} is not set)"
            )
        url, named = env[name], f"{where}.url_env ({name})"
    else:
        url, named = hook["url"], f"{where}.url"
    if not isinstance(url, str) or not url.startswith(("https://", "http://")):
        raise SettingsError(f"{named} must be an http(s) URL")
    try:
        host = httpx.URL(url).host
    except httpx.InvalidURL as e:
        raise SettingsError(f"{named} is not a valid URL: {e}") from None
    if not host:
        raise SettingsError(f"{named} has no host")
    allow_http = hook.get("allow_http", False)
    if not isinstance(allow_http, bool):
        raise SettingsError(f"{where}.allow_http must be true or false, got {allow_http!r}")
    problem = cleartext_problem(url)
    if problem and not allow_http:
        # Not the URL itself in the message: it is a credential (`webhook_label`).
        raise SettingsError(
            f"{named} ({webhook_label(url)}) {problem}; a receiver on a network trusted with"
            f" what is sent may be named over plain http with {where}.allow_http = true"
        )
    private: PrivateAllowance | None = None
    if "allow_private_addresses" in hook:
        try:
            private = private_allowance(
                hook["allow_private_addresses"], f"{where}.allow_private_addresses"
            )
        except ValueError as e:
            raise SettingsError(str(e)) from None
    if any(known.url == url for known in before):
        raise SettingsError(f"{named} names the same URL as an earlier webhook")
    secret = _secret(where, "secret_env", hook, env)
    previous = b""
    if "previous_secret_env" in hook:
        previous = _secret(where, "previous_secret_env", hook, env)
        if previous == secret:
            raise SettingsError(
                f"{where}.previous_secret_env names the same secret as secret_env: while a"
                " secret is rotated, secret_env holds the new one and previous_secret_env the"
                " old one"
            )
    return Webhook(
        url,
        secret,
        allow_http,
        previous_secret=previous,
        allow_private_addresses=private,
        where=where,
    )


def _secret(where: str, key: str, hook: dict, env: dict[str, str]) -> bytes:
    """The signing secret in the environment variable the webhook's ``key`` names."""
    name = hook.get(key)
    if not isinstance(name, str) or not env.get(name):
        raise SettingsError(
            f"{where}.{key} must name an environment variable that holds the"
            f" webhook's signing secret ({name!r} is not set)"
        )
    secret = env[name].encode()
    if len(secret) < MIN_SECRET_BYTES:
        raise SettingsError(
            f"{where}.{key}: the secret in {name} is {len(secret)} bytes; a webhook's"
            f" signing secret must be at least {MIN_SECRET_BYTES} (e.g. `openssl rand -hex 32`)"
        )
    return secret


@dataclass(frozen=True)
class WebhookDelivery:
    """The webhook keys a settings table shares ([approvals], [signals.alerts]): where to POST
    and how hard to try, parsed by `delivery_settings`."""

    webhooks: tuple[Webhook, ...] = ()
    # Attempts per webhook delivery, and the first delay between them (doubled each time).
    webhook_attempts: int = 5
    webhook_backoff_seconds: float = 1.0
    webhook_timeout_seconds: float = 5.0
    # Deliveries one process holds in memory at once (sending, or waiting for a retry due by the
    # next sweep); more wait in the database's outbox until there is room.
    webhook_queue_size: int = 1000


def delivery_settings(prefix: str, table: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """The webhook keys of a settings table (``webhooks``, ``webhook_attempts``,
    ``webhook_backoff_seconds``, ``webhook_timeout_seconds``, ``webhook_queue_size``), checked;
    ``prefix`` names the table in errors ("approvals", "signals.alerts")."""
    values: dict[str, Any] = {}
    for key in ("webhook_backoff_seconds", "webhook_timeout_seconds"):
        if key in table:
            values[key] = positive_seconds(f"{prefix}.{key}", table[key])
    for key in ("webhook_attempts", "webhook_queue_size"):
        if key in table:
            value = table[key]
            if type(value) is not int or value < 1:
                raise SettingsError(f"{prefix}.{key} must be a whole number, got {value!r}")
            values[key] = value
    hooks: list[Webhook] = []
    webhooks = table.get("webhooks") or ()
    if not isinstance(webhooks, list | tuple):
        raise SettingsError(f"{prefix}.webhooks must be a list of tables ([[{prefix}.webhooks]])")
    for i, hook in enumerate(webhooks):
        hooks.append(parse_webhook(f"{prefix}.webhooks[{i}]", hook, env, hooks))
    values["webhooks"] = tuple(hooks)
    return values


def positive_seconds(key: str, value: Any, allow_zero: bool = False) -> float:
    """A setting in seconds: a finite number above 0 (or 0, when ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SettingsError(f"{key} must be a number of seconds, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise SettingsError(f"{key} must be greater than 0, got {value!r}")
    return float(value)


def _migrations(name: str) -> list[str]:
    """The outbox and attempt tables of one kind of notification, named ``<name>_...``."""
    return [
        f"""
    CREATE TABLE {name}_outbox (
        delivery_id TEXT PRIMARY KEY,
        request_id TEXT NOT NULL,
        webhook TEXT NOT NULL,
        body TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        next_at DOUBLE PRECISION NOT NULL,
        owner TEXT NOT NULL,
        lease_until DOUBLE PRECISION NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        finished_at DOUBLE PRECISION,
        reason TEXT NOT NULL
    );
    CREATE INDEX {name}_outbox_due ON {name}_outbox (state, lease_until);
    CREATE TABLE {name}_deliveries (
        delivery_id TEXT NOT NULL,
        request_id TEXT NOT NULL,
        webhook TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        status_code INTEGER,
        error TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (delivery_id, attempt)
    );
    CREATE INDEX {name}_deliveries_request ON {name}_deliveries (request_id);
    """,
    ]


PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"


def prune_outbox(db: Database, name: str, before: float) -> dict[str, int]:
    """Delete the deliveries of the ``name`` outbox that finished (delivered, or failed) before
    ``before``, with their attempts (the audit retention, `bastion.audit.retention`). One not
    finished stays, whatever its age: it may still be sent."""
    return prune_rows(
        db,
        f"{name}s",
        f"{name}_outbox",
        "delivery_id",
        "state <> ? AND finished_at < ?",
        (PENDING, before),
        children=[(f"{name}_deliveries", "delivery_id")],
    )


@dataclass(frozen=True, slots=True)
class Delivery:
    """One notification to one webhook, as the outbox holds it."""

    id: str
    request_id: str  # the id of what it tells of (an approval request, an alert)
    webhook: str  # the webhook's label (`Webhook.label`): its URL is a credential
    body: str
    attempts: int  # made so far
    next_at: float  # when the next attempt is due

    @property
    def event(self) -> str:
        return json.loads(self.body).get("event", "")


@dataclass(frozen=True, slots=True)
class DeliveryState:
    """Where one delivery stands, as the outbox records it."""

    id: str
    request_id: str
    webhook: str
    state: str  # pending | delivered | failed
    attempts: int
    reason: str  # why it failed without an attempt (expired, webhook gone), else ""
    created_at: float
    finished_at: float | None


@dataclass(frozen=True, slots=True)
class Attempt:
    """One POST of a delivery, as recorded."""

    delivery_id: str
    request_id: str  # the id of what it tells of (an approval request, an alert)
    webhook: str  # the webhook's label
    attempt: int
    status_code: int | None
    error: str
    at: float


def shown(value: str) -> str:
    """An identifier chosen by someone else (an agent's client id, a user id, an upstream's tool
    name) as a chat tool shows it, in a code span: `bastion.names.readable`, which shows only
    letters, digits and a few plain marks as they are here; anything else (``<``, ``@``, ``*``,
    brackets, backticks, control, zero-width and direction characters) as its escape
    (``\\u003c``), so a name cannot mention ``@channel``, add a link of its own or restyle
    the message (in Slack ``<!channel>`` and ``<https://x|approve>`` are markup, in Mattermost
    and Teams ``[approve](https://x)`` is), and two names never read the same. Cut past 120
    characters, with a mark. An ``@`` after a letter or digit (``sam@example.com``, a common
    user id) is shown as it is: no chat tool reads a mention there."""
    return f"`{_ADDRESS_AT.sub('@', readable(value, _SHOWN_CHARS, _plain_in_chat))}`"


# An escaped ``@`` that follows a letter or digit shown as it is (not an escape's last digit:
# `readable` doubles every backslash of the name, so an escape is never preceded by one).
_ADDRESS_AT = re.compile(r"(?<=[^\W_])(?<!\\u[0-9a-f]{4})(?<!\\U[0-9a-f]{8})\\u0040")


def _plain_in_chat(char: str) -> bool:
    return char.isalnum() or char in "-_./:{}\"'=+, "


def sign(secret: bytes, body: bytes, timestamp: int, previous: bytes = b"") -> str:
    """The ``Bastion-Signature`` header for ``body`` sent at ``timestamp`` (unix seconds); with
    ``previous`` (a secret being rotated out), a second ``v1`` under it, last: a receiver that
    checks every ``v1`` verifies with either secret, and one that reads only the last (a
    dictionary of the header's parts) still verifies with the old one until it changes."""
    signed = f"{timestamp}.".encode() + body
    header = f"t={timestamp},v1={hmac.new(secret, signed, hashlib.sha256).hexdigest()}"
    if previous:
        header += f",v1={hmac.new(previous, signed, hashlib.sha256).hexdigest()}"
    return header


def outcome(status_code: int | None) -> str:
    """What an attempt's answer means: DELIVERED (2xx), FAILED (the receiver refused it for good:
    a 4xx other than 408 and 429, or a redirect, which is not followed), or PENDING (retry: 5xx,
    408, 429, or no answer at all, ``None``)."""
    if status_code is None:
        return PENDING
    if 200 <= status_code < 300:
        return DELIVERED
    if status_code >= 500 or status_code in (408, 429):
        return PENDING
    return FAILED


class DeliverySettings(Protocol):
    """What the outbox needs of a settings table (`ApprovalSettings`, `AlertSettings`)."""

    webhooks: tuple[Webhook, ...]
    webhook_attempts: int
    webhook_backoff_seconds: float
    webhook_timeout_seconds: float
    webhook_queue_size: int


class Outbox:
    """Sends queued notifications to the configured webhooks, in the background.

    `enqueue` may be called from any thread; `start` and `close` run on the server's event loop.
    ``name`` names its tables (``<name>_outbox``, ``<name>_deliveries``) and its migrations.
    """

    def __init__(
        self,
        name: str,
        settings: DeliverySettings,
        db: Database,
        *,
        clock: Callable[[], float] = time.time,
        sweep_seconds: float = SWEEP_SECONDS,
    ) -> None:
        self.name = name
        self.settings = settings
        self.db = db
        self.clock = clock
        self.sweep_seconds = sweep_seconds
        self.owner = secrets.token_hex(8)  # this process's name on the leases it holds
        self._hooks = {hook.label: hook for hook in settings.webhooks}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._runner: asyncio.Task | None = None
        self._active: dict[str, asyncio.Task] = {}
        self._full = False  # the last sweep filled the queue: more may wait in the outbox
        # What the log says of the database away: once for the sweeps, once for the records.
        self._outbox_outage = Outage(log)
        self._record_outage = Outage(log)
        self.sweeps = 0  # times the sender looked for work
        # One client per webhook, by label (`bastion.tls.fetching_client`): each its own
        # connection pool, so a receiver that holds its connections open holds only its own.
        self._clients: dict[str, httpx.AsyncClient] = {}
        db.migrate(f"{name}s", _migrations(name))

    # -- the asking side: any thread, never waits on a receiver ---------------------------------

    def enqueue(self, subject_id: str, body: Callable[[str], dict]) -> None:
        """Queue a notification about ``subject_id`` for every webhook (one outbox row each;
        ``body(delivery_id)`` is its JSON body) and wake the sender once they are committed.
        Inside a transaction on this outbox's `Database`, the rows are part of it: written with
        what they tell of (an approval request, an alert), or not at all. Does no HTTP; its only
        I/O is that insert."""
        if not self._hooks:
            return
        now = self.clock()
        rows = []
        for label in self._hooks:
            delivery_id = secrets.token_urlsafe(18)
            text = json.dumps(body(delivery_id), separators=(",", ":"))
            rows.append((delivery_id, subject_id, label, text, PENDING, 0, now, "", 0.0, now, ""))
        with self.db.transaction():
            self.db.executemany(
                f"INSERT INTO {self.name}_outbox (delivery_id, request_id, webhook, body, state,"
                " attempts, next_at, owner, lease_until, created_at, reason)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            self.db.after_commit(self._poke)

    def expires_at(self, delivery: Delivery) -> float | None:
        """When what ``delivery`` tells of can no longer be answered (the body's
        ``expires_at``): it is not sent after that. None: it does not expire."""
        return json.loads(delivery.body).get("expires_at")

    def _poke(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is None or wake is None:
            return  # not started: the rows wait in the outbox for `start`
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(wake.set)

    # -- the sender: a task on the event loop ---------------------------------------------------

    async def start(self) -> None:
        """Begin sending: what the outbox holds unfinished (from before a restart) first."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._clients = {
            label: fetching_client(
                allow_http=hook.allow_http,
                timeout=self.settings.webhook_timeout_seconds,
                headers={"User-Agent": "bastion-webhooks"},
            )
            for label, hook in self._hooks.items()
        }
        self._runner = asyncio.create_task(self._run(), name=f"bastion {self.name}s")

    async def close(self) -> None:
        """Stop sending; deliveries not finished go back to the outbox for the next start."""
        tasks = [t for t in (self._runner, *self._active.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._active.clear()
        self._runner = None
        self._loop = self._wake = None
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.aclose()
        try:
            await anyio.to_thread.run_sync(self._release)
        except Exception as e:
            log.warning(
                "webhooks: could not hand unfinished deliveries back to the outbox (%s); another"
                " process takes them when their lease ends",
                first_line(e),
            )

    @property
    def holding(self) -> int:
        """Deliveries this process holds now (sending, or waiting for a retry due soon)."""
        return len(self._active)

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            self._wake.clear()
            try:
                await self._sweep()
            except Exception as e:
                # The database is away, most likely: no traceback every few seconds for that.
                self._outbox_outage.failed(
                    "webhooks: could not read the outbox (%s); trying again", first_line(e)
                )
            else:
                self._outbox_outage.ended("webhooks: the outbox is read again")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.sweep_seconds):
                    await self._wake.wait()

    async def _sweep(self) -> None:
        room = self.settings.webhook_queue_size - len(self._active)
        self._full = room <= 0
        if self._full:
            self.sweeps += 1
            return
        claimed = await anyio.to_thread.run_sync(self._claim, room)
        self.sweeps += 1
        self._full = len(claimed) >= room
        for delivery in claimed:
            if delivery.id in self._active:
                continue  # ours already (its lease ran out while it waited): it goes on
            task = asyncio.create_task(self._deliver(delivery))
            self._active[delivery.id] = task
            task.add_done_callback(lambda _, d=delivery.id: self._finished(d))

    def _finished(self, delivery_id: str) -> None:
        self._active.pop(delivery_id, None)
        if self._full and self._wake is not None:
            self._wake.set()  # a slot is free, and deliveries may be waiting for one

    async def _deliver(self, delivery: Delivery) -> None:
        try:
            while True:
                attempt = delivery.attempts + 1
                hook = self._hooks.get(delivery.webhook)
                why = ""
                if hook is None:
                    # Left by an earlier configuration: there is no secret to sign it with.
                    why = "this webhook is no longer configured"
                elif attempt > self.settings.webhook_attempts:
                    why = (
                        f"{delivery.attempts} attempts made already; webhook_attempts is now"
                        f" {self.settings.webhook_attempts}"
                    )
                else:
                    await asyncio.sleep(max(0.0, delivery.next_at - self.clock()))
                    expires_at = self.expires_at(delivery)
                    if expires_at is not None and self.clock() >= expires_at:
                        # After a long outage: nobody can answer it any more.
                        why = "the request expired before it could be delivered"
                if why:
                    await anyio.to_thread.run_sync(self._give_up, delivery, why)
                    log.warning(
                        "webhook delivery %s of %s to %s not sent: %s",
                        delivery.id,
                        delivery.request_id,
                        delivery.webhook,
                        why,
                    )
                    return
                status_code, error = await self._post(delivery, hook)
                state = outcome(status_code)
                if state == PENDING and attempt >= self.settings.webhook_attempts:
                    state = FAILED
                delay = min(
                    self.settings.webhook_backoff_seconds * 2 ** min(attempt - 1, 32),
                    MAX_DELAY_SECONDS,
                )
                recorded = Attempt(
                    delivery.id,
                    delivery.request_id,
                    delivery.webhook,
                    attempt,
                    status_code,
                    error,
                    self.clock(),
                )
                kept = await self._keep(recorded, state, delay)
                if not kept:
                    return  # another process took it over (our lease ran out)
                if state == FAILED:
                    log.warning(
                        "webhook delivery %s of %s to %s failed at attempt %d: %s",
                        delivery.id,
                        delivery.request_id,
                        delivery.webhook,
                        attempt,
                        error or f"HTTP {status_code}",
                    )
                if state != PENDING or not self._waits_here(delay):
                    return  # done, or back in the outbox until its next attempt is near
                delivery = Delivery(
                    delivery.id,
                    delivery.request_id,
                    delivery.webhook,
                    delivery.body,
                    attempt,
                    recorded.at + delay,
                )
        except asyncio.CancelledError:
            raise
        except Exception:
            # The outbox row keeps it: when the lease ends, a sweep takes it up again.
            log.exception("webhook delivery %s of %s", delivery.id, delivery.request_id)

    async def _keep(self, attempt: Attempt, state: str, delay: float) -> bool:
        """Record an attempt, waiting out a database outage (sending again instead would
        notify twice): False if another process took the delivery over meanwhile. The outage
        is logged once for every delivery waiting it out, and once that attempts are recorded
        again."""
        while True:
            try:
                kept = await anyio.to_thread.run_sync(self._record, attempt, state, delay)
            except (DatabaseUnavailable, sqlite3.OperationalError) as e:
                self._record_outage.failed(
                    "webhooks: could not record attempt %d of delivery %s (%s); trying again",
                    attempt.attempt,
                    attempt.delivery_id,
                    first_line(e),
                )
                await asyncio.sleep(self.sweep_seconds)
                continue
            self._record_outage.ended("webhooks: attempts are recorded again")
            return kept

    async def _post(self, delivery: Delivery, hook: Webhook) -> tuple[int | None, str]:
        """One attempt: the status code, or None and what went wrong."""
        client = self._clients[delivery.webhook]
        body = delivery.body.encode()
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(hook.secret, body, int(self.clock()), hook.previous_secret),
            DELIVERY_HEADER: delivery.id,
            EVENT_HEADER: delivery.event,
        }
        target = httpx.URL(hook.url)
        extensions: dict[str, Any] = {}
        try:
            async with asyncio.timeout(self.settings.webhook_timeout_seconds):
                private = hook.private_addresses
                if private is not True:
                    # Resolved once, each address checked, and the connection made to the one
                    # checked: a name pointed into bastion's network after the check (DNS
                    # rebinding) cannot lead the signed POST there.
                    target, named, extensions = await pinned(target, private)
                    headers.update(named)
                # The answer's body is not read: a receiver cannot make bastion hold it.
                async with client.stream(
                    "POST", target, content=body, headers=headers, extensions=extensions
                ) as response:
                    return response.status_code, ""
        except TimeoutError:
            return None, f"no answer within {self.settings.webhook_timeout_seconds:g} s"
        except AddressRefused as e:
            # The deployment's own URL: its error, read by the deployment, names the address.
            found = f" ({e.address})" if e.address else ""
            error = (e.naming(hook.private_setting) + found)[:_ERROR_CHARS]
            log.warning(
                "webhook delivery %s of %s to %s %s: %s",
                delivery.id,
                delivery.request_id,
                delivery.webhook,
                "not sent" if isinstance(e, NameNotResolved) else "refused",
                error,
            )
            return None, error
        except httpx.HTTPError as e:
            # Neither the URL nor the address it was pinned to, path and all: the path is a
            # credential (`webhook_label`).
            error = f"{type(e).__name__}: {e}".replace(hook.url, hook.label)
            error = error.replace(str(target), hook.label)
            return None, error[:_ERROR_CHARS]

    # -- the outbox: database work, in worker threads --------------------------------------------

    def _lease(self, due: float) -> float:
        return max(due, self.clock()) + self.settings.webhook_timeout_seconds + LEASE_MARGIN_SECONDS

    def _waits_here(self, delay: float) -> bool:
        """Whether a delivery whose next attempt is ``delay`` seconds away waits for it in this
        process. One due later goes back to the outbox and gives up its place in the queue, so
        that a receiver failing everything under a long backoff cannot hold every place with
        its retries (the next webhook's deliveries waited behind them): a sweep takes it again
        within `sweep_seconds` of its time."""
        return delay <= self.sweep_seconds

    def _claim(self, limit: int) -> list[Delivery]:
        """Take up to ``limit`` unfinished deliveries nobody holds that are due by the next
        sweep, soonest due first."""
        now = self.clock()
        with self.db.transaction():
            rows = self.db.execute(
                f"SELECT delivery_id, next_at FROM {self.name}_outbox"
                " WHERE state = ? AND lease_until <= ? AND next_at <= ? ORDER BY next_at LIMIT ?",
                (PENDING, now, now + self.sweep_seconds, limit),
            )
            claimed = []
            for delivery_id, next_at in rows:
                taken = self.db.execute(
                    f"UPDATE {self.name}_outbox SET owner = ?, lease_until = ?"
                    " WHERE delivery_id = ? AND state = ? AND lease_until <= ?"
                    " RETURNING delivery_id, request_id, webhook, body, attempts, next_at",
                    (self.owner, self._lease(next_at), delivery_id, PENDING, now),
                )
                claimed.extend(Delivery(*row) for row in taken)
        return claimed

    def _record(self, attempt: Attempt, state: str, delay: float) -> bool:
        """Record an attempt and where the delivery stands; False if this process no longer
        holds it (nothing is written then)."""
        next_at = attempt.at + delay
        with self.db.transaction():
            held = self.db.execute(
                f"UPDATE {self.name}_outbox SET attempts = ?, state = ?, next_at = ?,"
                " lease_until = ?, finished_at = ?"
                " WHERE delivery_id = ? AND owner = ? AND attempts = ? AND state = ?"
                " RETURNING delivery_id",
                (
                    attempt.attempt,
                    state,
                    next_at,
                    self._lease(next_at) if state == PENDING and self._waits_here(delay) else 0.0,
                    None if state == PENDING else attempt.at,
                    attempt.delivery_id,
                    self.owner,
                    attempt.attempt - 1,
                    PENDING,
                ),
            )
            if not held:
                return False
            self.db.execute(
                f"INSERT INTO {self.name}_deliveries"
                " (delivery_id, request_id, webhook, attempt, status_code, error, at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    attempt.delivery_id,
                    attempt.request_id,
                    attempt.webhook,
                    attempt.attempt,
                    attempt.status_code,
                    attempt.error,
                    attempt.at,
                ),
            )
        return True

    def _give_up(self, delivery: Delivery, reason: str) -> None:
        self.db.execute(
            f"UPDATE {self.name}_outbox SET state = ?, reason = ?, finished_at = ?,"
            " lease_until = 0 WHERE delivery_id = ? AND owner = ? AND state = ?",
            (FAILED, reason, self.clock(), delivery.id, self.owner, PENDING),
        )

    def _release(self) -> None:
        self.db.execute(
            f"UPDATE {self.name}_outbox SET owner = '', lease_until = 0"
            " WHERE owner = ? AND state = ?",
            (self.owner, PENDING),
        )

    # -- reading the record (API, CLI, tests) ---------------------------------------------------

    def attempts(self, request_id: str) -> list[Attempt]:
        """Every attempt made to tell of ``request_id``, in order. Does I/O."""
        rows = self.db.execute(
            "SELECT delivery_id, request_id, webhook, attempt, status_code, error, at"
            f" FROM {self.name}_deliveries WHERE request_id = ? ORDER BY at, attempt",
            (request_id,),
        )
        return [Attempt(*row) for row in rows]

    def deliveries(self, request_id: str) -> list[DeliveryState]:
        """The deliveries telling of ``request_id``, one per webhook configured when it was
        made. Does I/O."""
        rows = self.db.execute(
            "SELECT delivery_id, request_id, webhook, state, attempts, reason, created_at,"
            f" finished_at FROM {self.name}_outbox WHERE request_id = ? ORDER BY webhook",
            (request_id,),
        )
        return [DeliveryState(*row) for row in rows]

    def state(self, request_id: str) -> dict[str, str]:
        """Each webhook's delivery state for ``request_id``: label -> pending | delivered |
        failed. Does I/O."""
        return {d.webhook: d.state for d in self.deliveries(request_id)}
