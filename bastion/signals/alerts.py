"""Alerts: raised by the policy or by bastion itself, deduplicated, told, escalated, acknowledged.

An alert is keyed by (name, principal). Raised again within ``cooldown_seconds`` of its last
raising it is the same alert: its count goes up and the decision id joins its (bounded) list of
decisions, and nobody is told again, unless it was acknowledged and the raising is more severe
than it: then it is open again and told again. A new alert is told to the principal's owner (a fact
``has_relation(Agent{...}, "owner", User{...})``, `bastion.agents.identity`; none: the configured fallback recipients); not acknowledged
within ``escalate_after_seconds``, it is told again naming the owner's manager (a stored fact
``manager(User{...}, User{...})``). The state lives in the database (``alerts`` table), so an
escalation survives a restart. Notifications go through the shared signed-webhook outbox
(`bastion.webhooks`, HMAC-SHA256 as RFC 2104); past ``notify_limit_count`` of them in a window
of ``notify_limit_seconds`` (the deployment's, counted in the database) the rest are folded into
one summary per window (`Alerts.tell_folded`), every alert stored all the same.

Entry points: `Alerts.raise_alert` (any thread; does I/O), for alerts bastion raises itself and
the ``alert(actor, name, severity)`` rules of the decision contract; `Alerts.count_again` (no I/O)
first, for a raising of an alert this process knows is within its cooldown (written later, in
one transaction, by `Alerts.write_repeats`); `Alerts.raise_all`, both from the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import anyio

from bastion.agents.identity import AGENT, USER, ancestors, owner_of, owners
from bastion.audit.log import AuditLog
from bastion.db import Database, first_line, prune_rows
from bastion.decide import Authorizer
from bastion.facts.model import Entity
from bastion.facts.store import FactStore
from bastion.ids import typed_id
from bastion.names import MAX_NAME_LENGTH, readable
from bastion.retries import Outage
from bastion.signals.behavior import BehaviorView
from bastion.webhooks import (
    SettingsError,
    WebhookDelivery,
    delivery_settings,
    positive_seconds,
)

log = logging.getLogger("bastion.signals.alerts")

SEVERITIES = ("low", "medium", "high", "critical")
# Each severity's rank, least severe first (`more_severe`).
_RANK = {severity: rank for rank, severity in enumerate(SEVERITIES)}
OPEN, ACKNOWLEDGED = "open", "acknowledged"
REFUSAL_BURST = "refusal_burst"
BULK_DESTRUCTIVE = "bulk_destructive"
BEHAVIOR_SPIKE = "behavior_spike"
CHANNELS = ("page", "api", "cli")
_REFUSERS = 100_000  # principals whose refusals are counted before the quiet ones are forgotten
_SLICES = 60  # a principal's refusals are counted per sixtieth of the burst window (`_Refusals`)
_KNOWN = 100_000  # alerts a process counts raisings of in memory (`Alerts.count_again`)

_MIGRATIONS = [
    """
    CREATE TABLE alerts (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        principal TEXT NOT NULL,
        severity TEXT NOT NULL,
        state TEXT NOT NULL,
        count INTEGER NOT NULL,
        decision_ids TEXT NOT NULL,
        detail TEXT NOT NULL,
        first_at DOUBLE PRECISION NOT NULL,
        last_at DOUBLE PRECISION NOT NULL,
        owner TEXT NOT NULL,
        recipients TEXT NOT NULL,
        escalate_at DOUBLE PRECISION,
        escalated_to TEXT NOT NULL,
        escalated_at DOUBLE PRECISION,
        acknowledged_by TEXT NOT NULL,
        acknowledged_at DOUBLE PRECISION,
        acknowledged_channel TEXT NOT NULL
    );
    CREATE INDEX alerts_key ON alerts (name, principal, last_at);
    CREATE INDEX alerts_escalate ON alerts (state, escalate_at);
    """,
    # The principals of the chains whose decisions raised it (`Alert.about`): an alert stored
    # before has none, and is about its principal and owner only.
    """
    ALTER TABLE alerts ADD COLUMN about TEXT NOT NULL DEFAULT '[]';
    """,
    # The notifications asked for in each window of ``notify_limit_seconds``, whichever replica
    # asked (`Alerts._folds`): past ``most``, folded into the window's one summary, queued
    # (``summed_at``) once the window is over (`Alerts.tell_folded`).
    """
    CREATE TABLE alert_notification_windows (
        start DOUBLE PRECISION PRIMARY KEY,
        seconds DOUBLE PRECISION NOT NULL,
        most INTEGER NOT NULL,
        asked INTEGER NOT NULL,
        escalations_folded INTEGER NOT NULL,
        summed_at DOUBLE PRECISION
    );
    CREATE INDEX alert_notification_windows_due ON alert_notification_windows (summed_at);
    """,
]


# The most bytes (UTF-8) of a principal as an alert names it: (name, principal) is indexed, and
# PostgreSQL indexes no entry over 2,704 bytes (a name is at most 200 characters).
MAX_PRINCIPAL_BYTES = 1500
# The most characters of an alert's name (`alert_name`).
MAX_NAME = 200
# The most alerts one listing returns, through the API or the command line.
MAX_LIST = 500
# The most principals of the raising chains an alert keeps (`Alert.about`). One that holds this
# many may be about more, whom it cannot name: with ``owner_may_acknowledge = false`` nobody can
# be shown not to be one of them, and it is not acknowledged (`Alerts.acknowledgement_refusal`).
MAX_ABOUT = 200
# The most decision ids an alert keeps (``max_decisions``, checked at start): each is in the
# alert's row, rewritten at each raising, and in its escalation's webhook body.
MAX_DECISIONS = 1000
# The most notifications ``notify_limit_count`` lets through a window, and the longest window
# (``notify_limit_seconds``): the summary of a window is sent when it ends.
MAX_NOTIFY_LIMIT_COUNT = 10_000_000
MAX_NOTIFY_LIMIT_SECONDS = 86_400.0


def principal_text(principal: Entity | str) -> str:
    """How an alert names ``principal``: as the policy writes it (``Agent{"client"}``), or, past
    `MAX_PRINCIPAL_BYTES`, its start and the SHA-256 digest of the whole. A policy's alert may
    name any entity, a tool whose name the client chose among them: one of 3,000 characters was
    an alert PostgreSQL never stored."""
    who = principal if isinstance(principal, str) else repr(principal)
    whole = who.encode("utf-8", "surrogatepass")
    if len(whole) <= MAX_PRINCIPAL_BYTES:
        return who
    start = whole[: MAX_PRINCIPAL_BYTES - 100].decode("utf-8", "ignore")
    return f"{start}... sha256:{hashlib.sha256(whole).hexdigest()}"


def alert_name(name: str) -> str:
    """How an alert is named: as its rule names it up to `MAX_NAME` characters, else its start
    and the SHA-256 digest of the whole; an empty name as ``""``. A rule may name its alert with
    a value of the request (the tool called, an argument), and an alert refused for its name
    was never raised: an agent chose not to be seen by sending a long or empty one."""
    if not name:
        return '""'
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{name[: MAX_NAME - 80]}... sha256:{digest}"


class AlertError(ValueError):
    """A request about alerts that cannot be done; the message says why."""


class AlertNotFound(AlertError):
    pass


class AcknowledgementRefused(AlertError):
    """The person named may not acknowledge the alert (``owner_may_acknowledge = false`` and
    it is about them); the message says why. Nothing was written."""


@dataclass(frozen=True, slots=True)
class AlertSettings(WebhookDelivery):
    """The ``[signals.alerts]`` table (docs/signals.md)."""

    cooldown_seconds: float = 300.0
    escalate_after_seconds: float = 900.0
    # The built-in refusal burst: more than ``refusal_burst_count`` refusals of one principal
    # within ``refusal_burst_seconds`` raises "refusal_burst" (0: off).
    refusal_burst_count: int = 20
    refusal_burst_seconds: float = 60.0
    refusal_burst_severity: str = "high"
    # Built in over the behaviour counters (the calling agent's figures): more than
    # ``bulk_destructive_count`` destructive calls within a minute raises "bulk_destructive";
    # calls in ten minutes above ``spike_ratio`` times the baseline, once there are at least
    # ``spike_min_calls`` of them, raise "behavior_spike" (0: off).
    bulk_destructive_count: int = 10
    bulk_destructive_severity: str = "critical"
    spike_ratio: float = 10.0
    spike_min_calls: int = 100
    spike_severity: str = "high"
    # Decision ids kept per alert (the first ones and the latest ones past that are dropped).
    max_decisions: int = 50
    # Who is named when a principal has no owner: user names, each told as User{"name"}.
    fallback_recipients: tuple[str, ...] = ()
    # How often the escalation task looks for alerts due.
    escalation_poll_seconds: float = 5.0
    # False: nobody an alert is about (its principal's owner, the users and agents' owners of
    # the chains that raised it) acknowledges it, on any channel (`Alerts.acknowledge`).
    owner_may_acknowledge: bool = True
    # How often raisings of an alert this process knows is within its cooldown, counted in
    # memory (`Alerts.count_again`), are written to its row.
    repeat_write_seconds: float = 1.0
    # At most ``notify_limit_count`` notifications (new alerts, alerts open again, escalations)
    # are sent one by one in each window of ``notify_limit_seconds``, counted in the database
    # for every replica; the rest are folded into one critical summary sent when the window
    # ends (`Alerts.tell_folded`). Every alert is stored all the same.
    notify_limit_count: int = 100
    notify_limit_seconds: float = 600.0
    # Where alerts are told (`bastion.webhooks`: signed, retried): the keys of `WebhookDelivery`,
    # with [[signals.alerts.webhooks]].

    @classmethod
    def from_mapping(
        cls, table: dict[str, Any], env: dict[str, str] | None = None
    ) -> AlertSettings:
        """The settings of ``table``; `SettingsError` names a key that is wrong and why. Secrets
        and URLs named by ``*_env`` keys are read from ``env`` (default: the environment)."""
        if not isinstance(table, dict):
            raise SettingsError("[signals.alerts] must be a table")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(table) - known)
        if unknown:
            raise SettingsError(
                f"unknown key [signals.alerts].{unknown[0]}; known keys: {', '.join(sorted(known))}"
            )
        values: dict[str, Any] = delivery_settings(
            "signals.alerts", table, dict(os.environ if env is None else env)
        )
        for key in (
            "cooldown_seconds",
            "escalate_after_seconds",
            "refusal_burst_seconds",
            "escalation_poll_seconds",
            "repeat_write_seconds",
        ):
            if key in table:
                values[key] = positive_seconds(f"signals.alerts.{key}", table[key], True)
        if "notify_limit_seconds" in table:
            key = "signals.alerts.notify_limit_seconds"
            v = positive_seconds(key, table["notify_limit_seconds"])
            if v > MAX_NOTIFY_LIMIT_SECONDS:
                raise SettingsError(
                    f"{key} must be at most {MAX_NOTIFY_LIMIT_SECONDS:.0f} (a day), got {v!r}:"
                    " the summary of what a window folds is sent when the window ends"
                )
            values["notify_limit_seconds"] = v
        if "spike_ratio" in table:
            v = table["spike_ratio"]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
                raise SettingsError(f"signals.alerts.spike_ratio must be a number >= 0, not {v!r}")
            values["spike_ratio"] = float(v)
        for key in (
            "refusal_burst_count",
            "max_decisions",
            "bulk_destructive_count",
            "spike_min_calls",
        ):
            if key in table:
                v = table[key]
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    raise SettingsError(f"signals.alerts.{key} must be an integer >= 0, not {v!r}")
                values[key] = v
        for key in ("refusal_burst_severity", "bulk_destructive_severity", "spike_severity"):
            if key in table:
                v = table[key]
                if v not in SEVERITIES:
                    raise SettingsError(
                        f"signals.alerts.{key} must be one of {', '.join(SEVERITIES)}, not {v!r}"
                    )
                values[key] = v
        if "owner_may_acknowledge" in table:
            v = table["owner_may_acknowledge"]
            if not isinstance(v, bool):
                raise SettingsError(
                    f"signals.alerts.owner_may_acknowledge must be true or false, not {v!r}"
                )
            values["owner_may_acknowledge"] = v
        if "fallback_recipients" in table:
            v = table["fallback_recipients"]
            if not isinstance(v, list) or not all(
                isinstance(x, str) and 0 < len(x) <= MAX_NAME_LENGTH for x in v
            ):
                raise SettingsError(
                    "signals.alerts.fallback_recipients must be a list of user names"
                    f' of 1 to {MAX_NAME_LENGTH} characters (e.g. ["oncall"])'
                )
            values["fallback_recipients"] = tuple(repr(Entity("User", x)) for x in v)
        if not 1 <= values.get("max_decisions", 1) <= MAX_DECISIONS:
            raise SettingsError(
                f"signals.alerts.max_decisions must be 1 to {MAX_DECISIONS},"
                f" not {values['max_decisions']!r}"
            )
        if "notify_limit_count" in table:
            v = table["notify_limit_count"]
            if (
                isinstance(v, bool)
                or not isinstance(v, int)
                or not 1 <= v <= MAX_NOTIFY_LIMIT_COUNT
            ):
                raise SettingsError(
                    "signals.alerts.notify_limit_count must be a whole number of 1 to"
                    f" {MAX_NOTIFY_LIMIT_COUNT:,}, not {v!r}"
                )
            values["notify_limit_count"] = v
        return cls(**values)


@dataclass(frozen=True, slots=True)
class Alert:
    id: str
    name: str
    principal: str  # as the policy writes it: Agent{"client"}
    severity: str
    state: str  # open | acknowledged
    count: int
    decision_ids: tuple[str, ...]
    detail: dict = field(hash=False)
    first_at: float = 0.0
    last_at: float = 0.0
    owner: str = ""  # the principal's owner, as found when it was raised ("" : none)
    recipients: tuple[str, ...] = ()  # who the first notification named
    escalate_at: float | None = None  # when it escalates unless acknowledged (None: not)
    escalated_to: tuple[str, ...] = ()
    escalated_at: float | None = None
    acknowledged_by: str = ""
    acknowledged_at: float | None = None
    acknowledged_channel: str = ""
    # The principals of the chains whose decisions raised it (user, agents), as the policy
    # writes them, at most `MAX_ABOUT`: whom, besides ``principal``, it is about.
    about: tuple[str, ...] = ()

    def public(self) -> dict[str, Any]:
        """As the API shows it."""
        return {
            "id": self.id,
            "name": self.name,
            "principal": self.principal,
            "severity": self.severity,
            "state": self.state,
            "count": self.count,
            "decision_ids": list(self.decision_ids),
            "detail": self.detail,
            "first_at": self.first_at,
            "last_at": self.last_at,
            "owner": self.owner or None,
            "recipients": list(self.recipients),
            "escalate_at": self.escalate_at,
            "escalated_to": list(self.escalated_to),
            "escalated_at": self.escalated_at,
            "acknowledged_by": self.acknowledged_by or None,
            "acknowledged_at": self.acknowledged_at,
            "acknowledged_channel": self.acknowledged_channel or None,
        }


@dataclass(frozen=True, slots=True)
class FoldedWindow:
    """A window of ``notify_limit_seconds`` that asked for more notifications than its limit:
    what its one summary tells (`Alerts.tell_folded`)."""

    start: float
    end: float
    limit: int  # the notifications it sent one by one
    folded: int  # the notifications it did not send one by one
    escalations: int  # of those, escalations (the others: new alerts, or alerts open again)
    recipients: tuple[str, ...]  # whom the summary names: the fallback recipients
    url: str  # where the alerts are listed (`GET /v1/alerts?state=open`)


_COLUMNS = (
    "id, name, principal, severity, state, count, decision_ids, detail, first_at, last_at,"
    " owner, recipients, escalate_at, escalated_to, escalated_at, acknowledged_by,"
    " acknowledged_at, acknowledged_channel, about"
)


def _alert(row: tuple) -> Alert:
    (
        id_,
        name,
        principal,
        severity,
        state,
        count,
        decisions,
        detail,
        first_at,
        last_at,
        owner,
        recipients,
        escalate_at,
        escalated_to,
        escalated_at,
        ack_by,
        ack_at,
        ack_channel,
        about,
    ) = row
    return Alert(
        id_,
        name,
        principal,
        severity,
        state,
        count,
        tuple(json.loads(decisions)),
        json.loads(detail),
        first_at,
        last_at,
        owner,
        tuple(json.loads(recipients)),
        escalate_at,
        tuple(json.loads(escalated_to)),
        escalated_at,
        ack_by,
        ack_at,
        ack_channel,
        tuple(json.loads(about)),
    )


def add_about(about: dict[str, None], chain: Iterable[Entity | str]) -> dict[str, None]:
    """Add to ``about`` (in order, as keys) the principals of ``chain`` not in it yet
    (`principal_text`), while it holds fewer than `MAX_ABOUT`; returns it."""
    for principal in chain:
        if len(about) >= MAX_ABOUT:
            break
        about.setdefault(principal_text(principal))
    return about


def severity_of(value: str, name: str) -> str:
    """A severity as given, or "high" (logged loudly) when it is not one of `SEVERITIES`: an
    alert whose rule is mistyped still fires, and errs on the side of being seen."""
    if value in SEVERITIES:
        return value
    log.error(
        "alert %r has severity %r, which is not one of %s: treated as high (fix the rule)",
        name,
        value,
        ", ".join(SEVERITIES),
    )
    return "high"


def more_severe(a: str, b: str) -> str:
    """The more severe of two `SEVERITIES` (``a`` when they are the same)."""
    return b if _RANK[b] > _RANK[a] else a


class _Repeats:
    """Raisings of one stored alert counted in memory (`Alerts.count_again`), not yet written:
    how many, the latest ``keep`` decision ids, the latest time, the most severe severity, the
    principals of their chains (`add_about`)."""

    __slots__ = ("about", "count", "decisions", "last_at", "severity")

    def __init__(self, keep: int) -> None:
        self.count = 0
        self.decisions: deque[str] = deque(maxlen=keep)
        self.last_at = 0.0
        self.severity = SEVERITIES[0]
        self.about: dict[str, None] = {}

    def add(
        self, severity: str, decision_id: str, now: float, chain: Iterable[Entity | str] = ()
    ) -> None:
        self.count += 1
        add_about(self.about, chain)
        # One decision's raisings of one alert come one after the other (`count_again`).
        if decision_id and (not self.decisions or self.decisions[-1] != decision_id):
            self.decisions.append(decision_id)
        if now > self.last_at:
            self.last_at = now
        self.severity = more_severe(self.severity, severity)

    def merge(self, later: _Repeats | None) -> None:
        """Take in ``later`` (counted after these): for raisings that could not be written."""
        if later is None:
            return
        self.count += later.count
        for decision_id in later.decisions:
            if decision_id not in self.decisions:
                self.decisions.append(decision_id)
        self.last_at = max(self.last_at, later.last_at)
        self.severity = more_severe(self.severity, later.severity)
        add_about(self.about, later.about)


class _Refusals:
    """One principal's refusals for the refusal burst, in memory bounded by the threshold, not
    by how fast they come: the times of the latest ``count + 1`` (whether they make a burst:
    the oldest of them is within the window), and how many fell in each sixtieth of the window
    (the alert's figure, `within`)."""

    __slots__ = ("latest", "slices")

    def __init__(self, count: int) -> None:
        self.latest: deque[float] = deque(maxlen=count + 1)
        self.slices: deque[list[int]] = deque()  # [slice index, refusals], oldest first

    def add(self, now: float, window: float) -> bool:
        """Count a refusal at ``now``; whether more than ``count`` fell within ``window``."""
        self.latest.append(now)
        width = window / _SLICES
        index = int(now // width)
        if self.slices and self.slices[-1][0] >= index:
            self.slices[-1][1] += 1  # the same sixtieth (or a clock set back: the latest)
        else:
            self.slices.append([index, 1])
        # A sixtieth before the one the window starts in lies wholly outside it.
        first = int((now - window) // width)
        while self.slices[0][0] < first:
            self.slices.popleft()
        latest = self.latest
        return len(latest) == latest.maxlen and latest[0] > now - window

    def within(self, now: float, window: float) -> int:
        """How many refusals fell within ``window``, at least: those of the sixtieths wholly
        within it (those of the sixtieth it starts in, partly gone, are left out), and never
        fewer than the latest kept, which are all within it when they make a burst."""
        first = int((now - window) // (window / _SLICES))
        inside = sum(refusals for index, refusals in self.slices if index > first)
        return max(inside, len(self.latest))

    def quiet(self, now: float, window: float) -> bool:
        return not self.latest or self.latest[-1] <= now - window


def prune_alerts(db: Database, before: float) -> dict[str, int]:
    """Delete the alerts last raised, acknowledged and escalated before ``before``, and due to
    escalate no later (the audit retention, `bastion.audit.retention`): an alert is kept as
    long as the audit trail, acknowledged or not. So do the counts of the notification windows
    over before it, once summed up or with nothing to sum up."""
    pruned = prune_rows(
        db,
        "signals_alerts",
        "alerts",
        "id",
        "last_at < ? AND COALESCE(acknowledged_at, 0) < ? AND COALESCE(escalated_at, 0) < ?"
        " AND COALESCE(escalate_at, 0) < ?",
        (before, before, before, before),
    )
    windows = prune_rows(
        db,
        "signals_alerts",
        "alert_notification_windows",
        "start",
        "start + seconds < ? AND (summed_at IS NOT NULL OR asked <= most)",
        (before,),
    )
    return {**pruned, **windows}


class AlertStore:
    """The ``alerts`` table. Every method does I/O: call from a worker thread."""

    def __init__(self, db: Database) -> None:
        self.db = db
        db.migrate("signals_alerts", _MIGRATIONS)

    def get(self, alert_id: str) -> Alert:
        rows = self.db.execute(f"SELECT {_COLUMNS} FROM alerts WHERE id = ?", (alert_id,))
        if not rows:
            raise AlertNotFound(f"no alert {alert_id!r}")
        return _alert(rows[0])

    def list(self, state: str | None = None, limit: int = 100) -> list[Alert]:
        if state is not None and state not in (OPEN, ACKNOWLEDGED):
            raise AlertError(f"state must be {OPEN} or {ACKNOWLEDGED}, not {state!r}")
        where, args = ("WHERE state = ?", (state,)) if state else ("", ())
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM alerts {where} ORDER BY last_at DESC LIMIT ?",
            (*args, limit),
        )
        return [_alert(r) for r in rows]

    def due(self, now: float) -> list[Alert]:
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM alerts WHERE state = ? AND escalate_at IS NOT NULL"
            " AND escalate_at <= ? ORDER BY escalate_at LIMIT 100",
            (OPEN, now),
        )
        return [_alert(r) for r in rows]


# `Alerts.behavior_alerts`: the scopes whose figures are looked at, in order, and what raises
# its two alerts (module functions, not closures made on every call).
_AGENT_SCOPE = ("agent",)
_PERSON_SCOPES = ("agent", "user")


def _many_destructive(minute: dict, settings: AlertSettings) -> bool:
    return minute["count"] + 1 > settings.bulk_destructive_count


def _spiking(calls: dict, settings: AlertSettings) -> bool:
    # Without history (baseline 0) there is nothing to be far above yet.
    return (
        calls["baseline"] > 0
        and calls["count"] >= settings.spike_min_calls
        and calls["ratio"] > settings.spike_ratio
    )


def _first(
    behavior: BehaviorView,
    scopes: tuple[str, ...],
    counter: str,
    window: str,
    raises: Callable[[dict, AlertSettings], bool],
    settings: AlertSettings,
) -> tuple | None:
    """The first of ``scopes`` whose figures raise the alert, with them (read through the view,
    so recorded: the user's are looked at first without being kept, `BehaviorView.peek`), or
    None."""
    for scope in scopes:
        if scope == "user" and not raises(behavior.peek(scope, counter, window), settings):
            continue
        figures = behavior[scope][counter][window]
        if raises(figures, settings):
            return scope, figures
    return None


class Alerts:
    """Raising, escalating and acknowledging alerts.

    ``notify(alert, stage, recipients)`` tells people (stage "raised" or "escalated"); it is
    called in the transaction that stores the new alert or its escalation, so that what it
    writes on the alerts' database (the webhook outbox's rows) is written with it or not at all,
    and one that fails undoes it. It must not wait on a receiver (the outbox only inserts).
    With ``notify_folded`` too, at most ``notify_limit_count`` notifications a window are sent
    one by one, whichever replica asks (`_folds`); the rest are folded into the window's one
    summary, ``notify_folded(window)``, queued when the window ends (`tell_folded`)."""

    def __init__(
        self,
        store: AlertStore,
        settings: AlertSettings,
        authorizer: Callable[[], Authorizer],
        issuer: str,
        notify: Callable[[Alert, str, tuple[str, ...]], None] | None = None,
        clock: Callable[[], float] = time.time,
        notify_folded: Callable[[FoldedWindow], None] | None = None,
    ) -> None:
        self.store = store
        self._fact_store: FactStore | None = None
        self.settings = settings
        self.authorizer = authorizer
        self.issuer = issuer.rstrip("/")
        self.notify = notify
        # Tells a window's summary (`tell_folded`); None: no limit, each notification is sent.
        self.notify_folded = notify_folded
        self.webhooks: Any = None  # the signed webhooks that `notify` queues for, if any
        self.clock = clock
        self._refusals: dict[str, _Refusals] = {}
        self._refusals_pruned_at = _REFUSERS
        self._lock = threading.Lock()
        # (name, principal) -> the id and latest raising of the alert this process last stored
        # or counted for it; alert id -> its raisings counted in memory, not yet written.
        self._known: dict[tuple[str, str], tuple[str, float]] = {}
        self._repeats: dict[str, _Repeats] = {}

    def url(self, alert_id: str) -> str:
        return f"{self.issuer}/alerts/{alert_id}"

    @property
    def list_url(self) -> str:
        """Where the open alerts are listed (the API), as a window's summary names it."""
        return f"{self.issuer}/v1/alerts?state=open"

    # -- raising ---------------------------------------------------------------------------------

    def count_again(
        self,
        name: str,
        severity: str,
        principal: Entity | str,
        decision_id: str = "",
        chain: Iterable[Entity | str] = (),
    ) -> bool:
        """Count a raising of an alert this process stored or counted within its cooldown, in
        memory (no I/O: the loop may call it); `write_repeats` writes it to the alert's row
        within ``repeat_write_seconds``. False (nothing counted): raise it with `raise_alert`.
        ``chain``: the principals of the decision's chain (`Alert.about`)."""
        settings = self.settings
        if settings.repeat_write_seconds <= 0:
            return False
        key = (alert_name(name), principal_text(principal))
        now = self.clock()
        with self._lock:
            known = self._known.get(key)
            if known is None or known[1] < now - settings.cooldown_seconds:
                return False
            alert_id, last_at = known
            if now > last_at:
                self._known[key] = (alert_id, now)
            repeats = self._repeats.get(alert_id)
            if repeats is None:
                repeats = self._repeats[alert_id] = _Repeats(settings.max_decisions)
            repeats.add(severity_of(severity, name), decision_id, now, chain)
        return True

    async def raise_all(
        self,
        raisings: list[tuple[str, str, Entity | str, dict[str, Any]]],
        decision_id: str = "",
        chain: Iterable[Entity | str] = (),
    ) -> None:
        """Raise each of ``raisings`` (name, severity, principal, detail), from the event loop:
        one this process knows is within its cooldown is counted again in memory
        (`count_again`: an agent in a spike, a refusal burst, costs no write per call); the
        others are raised in a worker thread (database I/O). One that cannot be stored is
        logged, and the others are still raised. ``chain``: the principals of the decision's
        chain, whom the alerts are about (`Alert.about`)."""
        chain = tuple(chain)
        rest = [r for r in raisings if not self.count_again(*r[:3], decision_id, chain)]
        if not rest:
            return

        def work() -> None:
            for name, severity, principal, detail in rest:
                try:
                    self.raise_alert(name, severity, principal, decision_id, detail, chain)
                except Exception:
                    log.exception("alert %r of decision %s could not be raised", name, decision_id)

        await anyio.to_thread.run_sync(work)

    def write_repeats(self) -> int:
        """Write the raisings `count_again` counted to their alerts' rows, in one transaction:
        how many. Does I/O. Those it could not write are counted again for the next time."""
        with self._lock:
            taken, self._repeats = self._repeats, {}
        self._forget_quiet()
        if not taken:
            return 0
        db = self.store.db
        gone = set()
        try:
            with db.transaction():
                reopened = []
                # Each row read under its lock (as `raise_alert` reads it), taken in one order
                # by every replica: neither writes over what the other added since it read.
                for alert_id, repeats in sorted(taken.items()):
                    rows = db.execute(
                        f"SELECT {_COLUMNS} FROM alerts WHERE id = ?"
                        + (" FOR UPDATE" if db.is_postgres else ""),
                        (alert_id,),
                    )
                    if not rows:
                        gone.add(alert_id)
                        continue
                    alert = _alert(rows[0])
                    if self._count_into(
                        alert,
                        repeats.count,
                        repeats.decisions,
                        repeats.last_at,
                        repeats.severity,
                        repeats.about,
                    ):
                        reopened.append(alert)
                # Told once every row is written: the window's row (`_folds`) is the last lock
                # each transaction takes, so that none waits for a row another holds while
                # holding the window's.
                for alert in reopened:
                    self._tell(self.store.get(alert.id), "raised", alert.recipients)
        except Exception:
            with self._lock:
                for alert_id, repeats in taken.items():
                    repeats.merge(self._repeats.get(alert_id))
                    self._repeats[alert_id] = repeats
            raise
        if gone:  # removed from the table: the next raising makes a new alert
            log.warning("alerts %s are gone: their repeated raisings not counted", sorted(gone))
            with self._lock:
                for key in [k for k, (alert_id, _) in self._known.items() if alert_id in gone]:
                    del self._known[key]
        return sum(r.count for alert_id, r in taken.items() if alert_id not in gone)

    def _count_into(
        self,
        alert: Alert,
        count: int,
        decisions: Iterable[str],
        last_at: float,
        severity: str,
        chain: Iterable[Entity | str] = (),
    ) -> bool:
        """Under the transaction that read ``alert``'s row under its lock: add ``count``
        raisings of it (their decision ids, the latest of their times, their most severe
        severity, the principals of their chains), as `raise_alert` and `write_repeats` do.
        Whether that opened it again (the caller tells it, `_tell`)."""
        kept = alert.decision_ids
        kept = (*kept, *(d for d in decisions if d and d not in kept))[
            -self.settings.max_decisions :
        ]
        # The most severe raising decides how the alert reads. An acknowledged alert raised
        # more severe than it was is news: open again, told again, escalating again. Raisings
        # within the cooldown can keep coming for ever, and would otherwise keep a "critical"
        # silent under a "low" that someone acknowledged once.
        worst = more_severe(alert.severity, severity)
        reopens = alert.state == ACKNOWLEDGED and worst != alert.severity
        db = self.store.db
        about = list(add_about(dict.fromkeys(alert.about), chain))
        db.execute(
            "UPDATE alerts SET count = count + ?, decision_ids = ?, last_at = ?, severity = ?,"
            " about = ?" + (", state = ?, escalate_at = ?" if reopens else "") + " WHERE id = ?",
            (
                count,
                json.dumps(kept),
                max(alert.last_at, last_at),
                worst,
                json.dumps(about),
                *((OPEN, self.clock() + self.settings.escalate_after_seconds) if reopens else ()),
                alert.id,
            ),
        )
        return reopens

    def _forget_quiet(self) -> None:
        """Forget the alerts past their cooldown, which `count_again` no longer counts (looked
        for outside the lock, which the event loop takes)."""
        with self._lock:
            known = list(self._known.items())
        horizon = self.clock() - self.settings.cooldown_seconds
        quiet = [(key, entry) for key, entry in known if entry[1] < horizon]
        if quiet:
            with self._lock:
                for key, entry in quiet:
                    if self._known.get(key) == entry:  # not counted again meanwhile
                        del self._known[key]

    async def write_repeats_forever(self) -> None:
        """The background task: `write_repeats` every ``repeat_write_seconds`` (at shutdown the
        server calls it once more). A database away is said once, not at every round."""
        outage = Outage(log)
        while True:
            await asyncio.sleep(self.settings.repeat_write_seconds or 1.0)
            if not (self._repeats or self._known):
                continue
            try:
                await anyio.to_thread.run_sync(self.write_repeats)
            except Exception as e:
                outage.failed(
                    "alerts: repeated raisings not written (%s); trying again", first_line(e)
                )
            else:
                outage.ended("alerts: repeated raisings are written again")

    def _remember(self, name: str, who: str, alert_id: str, now: float) -> None:
        with self._lock:
            if len(self._known) >= _KNOWN:  # bounded: `_forget_quiet` makes room
                return
            known = self._known.get((name, who))
            self._known[(name, who)] = (alert_id, max(now, known[1]) if known else now)

    def raise_alert(
        self,
        name: str,
        severity: str,
        principal: Entity | str,
        decision_id: str = "",
        detail: dict[str, Any] | None = None,
        chain: Iterable[Entity | str] = (),
    ) -> Alert:
        """Raise ``name`` for ``principal`` (the hook for alerts bastion raises itself: refusal
        bursts here; bulk destructive actions, behaviour far above baseline, a suspended agent
        still calling elsewhere). Within the cooldown of the same (name, principal) it counts
        the same alert again and tells nobody. ``chain``: the principals of the decision's
        chain (the user, the agents), whom it is about too (`Alert.about`). Does I/O: call
        from a worker thread."""
        if not isinstance(name, str):
            raise AlertError(f"an alert's name must be text, not {type(name).__name__}")
        name = alert_name(name)
        severity = severity_of(severity, name)
        whole = principal if isinstance(principal, str) else repr(principal)
        who = principal_text(principal)
        now = self.clock()
        db = self.store.db
        # Opened before the transaction: the tables it makes on first use would go with a
        # raising that fails, and the store, kept, would then read tables that are not there.
        facts = self._facts
        with db.transaction():
            # Raisings of one (name, principal) read and write one at a time, whichever replica
            # raises: the second waits for the first's alert and counts into it; the row is read
            # under its lock, as `write_repeats` reads it.
            db.lock(json.dumps(["alert", name, who]))
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM alerts WHERE name = ? AND principal = ? AND last_at >= ?"
                " ORDER BY last_at DESC LIMIT 1" + (" FOR UPDATE" if db.is_postgres else ""),
                (name, who, now - self.settings.cooldown_seconds),
            )
            if rows:
                alert = _alert(rows[0])
                if self._count_into(alert, 1, (decision_id,), now, severity, chain):
                    self._tell(self.store.get(alert.id), "raised", alert.recipients)
                self._remember(name, who, alert.id, now)
                return self.store.get(alert.id)
            owner = self._owner(facts, whole)
            recipients = (owner,) if owner else self.settings.fallback_recipients
            alert = Alert(
                typed_id(12),  # shown and typed: never read as an option
                name,
                who,
                severity,
                OPEN,
                1,
                (decision_id,) if decision_id else (),
                dict(detail or {}),
                now,
                now,
                owner,
                recipients,
                now + self.settings.escalate_after_seconds,
                about=tuple(add_about({}, chain)),
            )
            db.execute(
                f"INSERT INTO alerts ({_COLUMNS}) VALUES"
                " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    alert.id,
                    name,
                    who,
                    severity,
                    OPEN,
                    1,
                    json.dumps(alert.decision_ids),
                    json.dumps(alert.detail, default=str),
                    now,
                    now,
                    owner,
                    json.dumps(recipients),
                    alert.escalate_at,
                    "[]",
                    None,
                    "",
                    None,
                    "",
                    json.dumps(alert.about),
                ),
            )
            # In the same transaction: a process killed after the alert and before its
            # notification left an alert that nobody would be told of, its raisings counted.
            self._tell(alert, "raised", recipients)
        self._remember(name, who, alert.id, now)
        log.warning("alert %s %r (%s) for %s raised", alert.id, name, severity, who)
        return alert

    def refusal_burst(
        self, principal: Entity, detail: dict[str, Any]
    ) -> tuple[str, str, Entity, dict[str, Any]] | None:
        """Count a refusal of ``principal`` (in memory, no I/O): the "refusal_burst" alert to
        raise as (name, severity, principal, detail) when it makes a burst, else None."""
        n, window = self.settings.refusal_burst_count, self.settings.refusal_burst_seconds
        if n <= 0:
            return None
        key = repr(principal)
        now = self.clock()
        with self._lock:
            seen = self._refusals.get(key)
            if seen is None or seen.latest.maxlen != n + 1:  # new, or the threshold changed
                seen = self._refusals[key] = _Refusals(n)
            burst = seen.add(now, window)
            refusals = seen.within(now, window) if burst else 0
            if len(self._refusals) > self._refusals_pruned_at:  # bounded: forget quiet ones
                for k in [k for k, v in self._refusals.items() if v.quiet(now, window)]:
                    del self._refusals[k]
                # Looked for again once it has grown by a tenth: not on every refusal (on the
                # event loop) while more than that many principals are refused.
                self._refusals_pruned_at = max(_REFUSERS, len(self._refusals) * 11 // 10)
        if not burst:
            return None
        return (
            REFUSAL_BURST,
            self.settings.refusal_burst_severity,
            principal,
            {**detail, "refusals": refusals, "within_seconds": window},
        )

    def behavior_alerts(
        self, behavior: BehaviorView, destructive: bool, person: bool = True
    ) -> list[tuple[str, str, str, dict[str, Any]]]:
        """The built-in alerts the caller's behaviour figures (``context.behavior`` as the
        decision saw them, before this message) call for: (scope, name, severity, detail), the
        scope ``agent`` (raised for the calling agent) or ``user`` (for the user it acts for).
        The agent's figures first; where they call for nothing, the user's (``person``: a
        person is in the chain), which add up every agent of the user: an agent that spreads
        its calls over new OAuth clients (dynamic registration is open) or sub-agents, each
        under the threshold or without a baseline, is still one user in bulk. Reads no more
        figures than the enabled ones need, through the view, so the decision record shows the
        figures that raised an alert; the user's are looked at first without being kept
        (`BehaviorView.peek`: read on every call and kept in every record, they cost 5 % of a
        gateway call's instructions). A `BehaviorUnavailable` propagates."""
        settings = self.settings
        scopes = _PERSON_SCOPES if person else _AGENT_SCOPE
        raised = []
        if destructive and settings.bulk_destructive_count > 0:
            found = _first(behavior, scopes, "destructive", "minute", _many_destructive, settings)
            if found is not None:
                scope, minute = found
                detail = {
                    "destructive_calls": minute["count"] + 1,
                    "within_seconds": 60,
                    "scope": scope,
                }
                raised.append((scope, BULK_DESTRUCTIVE, settings.bulk_destructive_severity, detail))
        if settings.spike_ratio > 0 and settings.spike_min_calls > 0:
            found = _first(behavior, scopes, "calls", "ten_minutes", _spiking, settings)
            if found is not None:
                scope, calls = found
                detail = {
                    "calls": calls["count"],
                    "baseline": calls["baseline"],
                    "seconds": 600,
                    "scope": scope,
                }
                raised.append((scope, BEHAVIOR_SPIKE, settings.spike_severity, detail))
        return raised

    # -- escalation ------------------------------------------------------------------------------

    def escalate_due(self) -> list[Alert]:
        """Tell the owner's manager of every open alert past its escalation time. Does I/O.
        An escalation and its notification are one transaction: one that cannot be told is
        not recorded either, and is tried again at the next round (logged)."""
        done = []
        db = self.store.db
        for due in self.store.due(self.clock()):
            managers = self._managers(due.owner) if due.owner else ()
            to = managers or self.settings.fallback_recipients
            try:
                with db.transaction():
                    changed = db.execute(
                        "UPDATE alerts SET escalate_at = NULL, escalated_at = ?, escalated_to = ?"
                        " WHERE id = ? AND state = ? AND escalate_at IS NOT NULL RETURNING id",
                        (self.clock(), json.dumps(to), due.id, OPEN),
                    )
                    if not changed:
                        continue  # acknowledged meanwhile, or another replica escalated it
                    alert = self.store.get(due.id)
                    self._tell(alert, "escalated", to)
            except Exception:
                log.exception("alert %s: its escalation could not be told; tried again", due.id)
                continue
            log.warning("alert %s %r escalated to %s", alert.id, alert.name, ", ".join(to))
            done.append(alert)
        return done

    def _escalation_round(self) -> None:
        self.escalate_due()
        self.tell_folded()

    async def escalate_forever(self) -> None:
        """The background task: escalate what is due, and sum up the windows over that folded
        notifications (`tell_folded`), every ``escalation_poll_seconds``. A database away is
        said once, not at every round."""
        outage = Outage(log)
        while True:
            try:
                await anyio.to_thread.run_sync(self._escalation_round)
            except Exception as e:
                outage.failed("alerts: could not escalate (%s); trying again", first_line(e))
            else:
                outage.ended("alerts: escalating again")
            await asyncio.sleep(self.settings.escalation_poll_seconds or 1.0)

    # -- acknowledging ---------------------------------------------------------------------------

    def acknowledge(self, alert_id: str, by: str, channel: str, *, via: str = "") -> Alert:
        """Acknowledge: no escalation after this; who, when and how are recorded on the alert
        and, in the same transaction, as ``alert.acknowledged`` in the audit log. ``via``: who
        vouched that ``by`` acknowledges (an API key, the CLI's OS user; none on the alert's
        page, where ``by`` signed in). Every channel comes here, so `AcknowledgementRefused`
        (``owner_may_acknowledge = false``, `acknowledgement_refusal`) holds on each. Does I/O."""
        if channel not in CHANNELS:
            raise AlertError(f"channel must be one of {', '.join(CHANNELS)}, not {channel!r}")
        if not by:
            raise AlertError("an acknowledgement must say who acknowledges")
        db = self.store.db
        facts = self._facts if not self.settings.owner_may_acknowledge else None
        # One statement, conditional: of two acknowledgements at once (two replicas), one is
        # recorded and the other told who made it, never the second written over the first.
        with db.transaction():
            if facts is not None:
                alert = self.store.get(alert_id)  # AlertNotFound if there is none
                refusal = None if alert.state == ACKNOWLEDGED else self._refusal(facts, alert, by)
                if refusal is not None:
                    raise AcknowledgementRefused(refusal)
            rows = db.execute(
                "UPDATE alerts SET state = ?, escalate_at = NULL, acknowledged_by = ?,"
                " acknowledged_at = ?, acknowledged_channel = ? WHERE id = ? AND state <> ?"
                f" RETURNING {_COLUMNS}",
                (ACKNOWLEDGED, by, self.clock(), channel, alert_id, ACKNOWLEDGED),
            )
            if rows:
                alert = _alert(rows[0])
                AuditLog(db).record(
                    "alert.acknowledged",
                    alert_id=alert.id,
                    name=alert.name,
                    principal=alert.principal,
                    by=by,
                    channel=channel,
                    **({"via": via} if via else {}),
                )
                return alert
        alert = self.store.get(alert_id)  # AlertNotFound if there is none
        raise AlertError(
            f"alert {alert_id} was acknowledged already, by {readable(alert.acknowledged_by)}"
        )

    def may_acknowledge(self, alert: Alert, person: str) -> bool:
        """Whether the signed-in user ``person`` is someone the alert was told to (its owner,
        a recipient, or whom it escalated to): only they acknowledge it on its page."""
        who = repr(Entity("User", person))
        return who in {alert.owner, *alert.recipients, *alert.escalated_to}

    def acknowledgement_refusal(self, alert: Alert, person: str) -> str | None:
        """Why ``person`` may not acknowledge ``alert`` (None: nothing in the way of it here):
        with ``owner_may_acknowledge = false``, nobody the alert is about acknowledges it
        (`about_people`). Does I/O (the stored facts): call from a worker thread."""
        if self.settings.owner_may_acknowledge:
            return None
        return self._refusal(self._facts, alert, person)

    def _refusal(self, facts: FactStore, alert: Alert, person: str) -> str | None:
        if len(alert.about) >= MAX_ABOUT:
            why = (
                f"it was raised by the calls of more than the {MAX_ABOUT} principals it can"
                " name, so nobody can be shown not to be one of them or their owner"
            )
        else:
            why = about_people(facts, alert).get(person)
            if why is None:
                return None
        return (
            f"{person} may not acknowledge alert {alert.id}: {why}, and with [signals.alerts]"
            " owner_may_acknowledge = false nobody acknowledges an alert about their own agent."
            " It stays open and escalates as usual; someone else it was told to acknowledges it."
        )

    def may_see(self, alert: Alert, person: str) -> bool:
        """Whether the signed-in user ``person`` may see the alert on its page: someone it was
        told to (`may_acknowledge`) or whoever acknowledged it. To anyone else it is not there."""
        return self.may_acknowledge(alert, person) or alert.acknowledged_by == person

    # -- who is told -----------------------------------------------------------------------------

    @property
    def _facts(self) -> FactStore:
        """Owners and managers are read from the stored facts, whatever the policy declares."""
        if self._fact_store is None:
            self._fact_store = FactStore(self.store.db)
        return self._fact_store

    def _owner(self, facts: FactStore, principal: str) -> str:
        """The agent's owner, ``has_relation(Agent{...}, "owner", User{...})`` as stored
        (`bastion.agents.identity.owner_of`: one path for every reader), or ""."""
        try:
            owner = owner_of(facts, Entity.parse(principal))
        except Exception:
            log.exception("alerts: the owner of %s could not be read", principal)
            return ""
        return repr(owner) if owner is not None else ""

    def _managers(self, owner: str) -> tuple[str, ...]:
        try:
            rows = self._facts.get(("manager", Entity.parse(owner), None))
        except Exception:
            log.exception("alerts: the managers of %s could not be read", owner)
            return ()
        return tuple(sorted(repr(f.fact[2]) for f in rows if isinstance(f.fact[2], Entity)))

    def _tell(self, alert: Alert, stage: str, recipients: tuple[str, ...]) -> None:
        """Inside the transaction that stores what is told of: a failure undoes it. Past the
        window's limit (`_folds`) it is not sent, but counted for the window's summary: the
        alert, or its escalation, is stored all the same."""
        if self.notify is None:
            return
        if self.notify_folded is not None and self._folds(stage):
            log.info(
                "alert %s %r: %s, not told (past notify_limit_count)", alert.id, alert.name, stage
            )
            return
        self.notify(alert, stage, recipients)

    # -- the notification limit ------------------------------------------------------------------

    def _folds(self, stage: str) -> bool:
        """Count a notification asked for (``stage``) in the window of ``notify_limit_seconds``
        it falls in: whether it is past the window's limit, to be folded into its summary.
        Counted in the database, one row per window whichever replica asks, in the transaction
        that stores what it tells of: the row stays locked until it commits, so replicas count
        one after the other, and an alert that is not stored is not counted. One asked for once
        the window's summary is queued (a replica whose clock is behind) is sent: the summary
        cannot name it any more."""
        settings = self.settings
        seconds = settings.notify_limit_seconds
        start = math.floor(self.clock() / seconds) * seconds
        db = self.store.db
        db.execute(
            "INSERT INTO alert_notification_windows"
            " (start, seconds, most, asked, escalations_folded, summed_at)"
            " VALUES (?, ?, ?, 0, 0, NULL) ON CONFLICT (start) DO NOTHING",
            (start, seconds, settings.notify_limit_count),
        )
        [(asked, most, summed_at)] = db.execute(
            "UPDATE alert_notification_windows SET asked = asked + 1,"
            " escalations_folded = escalations_folded"
            " + CASE WHEN asked >= most AND summed_at IS NULL THEN ? ELSE 0 END"
            " WHERE start = ? RETURNING asked, most, summed_at",
            (int(stage == "escalated"), start),
        )
        return asked > most and summed_at is None

    def tell_folded(self) -> list[FoldedWindow]:
        """Queue the one summary (`notify_folded`) of each window over, by this clock, that
        folded notifications: marked summed up and told in one transaction, by a conditional
        update, so that of replicas looking at once one tells it, once; one that cannot be
        told is tried again at the next round. Does I/O."""
        if self.notify_folded is None:
            return []
        now = self.clock()
        db = self.store.db
        told = []
        with db.transaction():
            rows = db.execute(
                "UPDATE alert_notification_windows SET summed_at = ?"
                " WHERE summed_at IS NULL AND start + seconds <= ?"
                " RETURNING start, seconds, most, asked, escalations_folded",
                (now, now),
            )
            for start, seconds, most, asked, escalations in sorted(rows):
                if asked <= most:
                    continue  # nothing folded: nothing to sum up
                window = FoldedWindow(
                    start,
                    start + seconds,
                    most,
                    asked - most,
                    escalations,
                    self.settings.fallback_recipients,
                    self.list_url,
                )
                self.notify_folded(window)
                told.append(window)
        for window in told:
            log.warning(
                "alerts: %d notifications (%d escalations) past the %d of the window from %s"
                " were folded; its summary is told",
                window.folded,
                window.escalations,
                window.limit,
                time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(window.start)),
            )
        return told


def about_people(facts: FactStore, alert: Alert) -> dict[str, str]:
    """The people ``alert`` is about, each user name with why: a user it is raised for or
    whose call raised it, the owner it was told to, and the owners (as stored now) of every
    agent of the raising chains and of their parent agents, up the whole chain of delegation
    (`bastion.agents.identity.ancestors`)."""
    people: dict[str, str] = {}
    principals = dict.fromkeys((alert.principal, *alert.about))
    for text in principals:
        try:
            principal = Entity.parse(text)
        except Exception:
            continue  # a name too long to be kept whole (`principal_text`): no user's or agent's
        if principal.type == USER:
            people.setdefault(
                principal.id,
                f"it is about them ({text})"
                if text == alert.principal
                else f"it was raised by a call made for them ({text})",
            )
        elif principal.type == AGENT:
            for agent_id in (principal.id, *ancestors(facts, principal.id)):
                for owner_id in owners(facts, agent_id):
                    people.setdefault(
                        owner_id, f"they own {Entity(AGENT, agent_id)!r}, whose calls raised it"
                    )
    if alert.owner:  # owned when it was raised, whoever owns the agent now
        owner = Entity.parse(alert.owner)
        people.setdefault(owner.id, f"they are the owner it was told to ({alert.owner})")
    return people


def alerts_from_config(
    database: str,
    table: dict[str, Any],
    issuer: str,
    authorizer: Callable[[], Authorizer],
) -> Alerts:
    """The alerts of a server with a gateway: their own database connection and settings."""
    settings = AlertSettings.from_mapping(table)
    db = Database(database, role="bastion-alerts")
    alerts = Alerts(AlertStore(db), settings, authorizer, issuer)
    if settings.webhooks:
        from bastion.signals.alert_webhooks import AlertWebhooks

        alerts.webhooks = AlertWebhooks(settings, db, alerts.url)
        alerts.notify = alerts.webhooks.notify
        alerts.notify_folded = alerts.webhooks.notify_folded
    return alerts
