"""The Shared Signals receiver (OpenID SSF 1.0, CAEP 1.0, RISC 1.0): bastion as a SET Recipient.

Security Event Tokens (RFC 8417) arrive by push (RFC 8935, ``POST /ssf/events`` with the stream's
bearer token) or by poll (RFC 8936, a background task per transmitter), are verified
(`bastion.signals.set_tokens`), and applied exactly once per ``jti``: a revoked session or changed
credential revokes every grant of the user (their tokens are refused on the next call and their
gateway streams end), a disabled, purged or compromised account disables the user, and device
compliance, assurance level and token claims become facts the policy reads. Every SET received is
an audit event (``signal.received``); refused ones are ``signal.refused``. Streams are created,
read and verified through the transmitter's stream management API (SSF 1.0 §8): one the
transmitter already holds for bastion (409 at creation, §8.1.1.1) is read and used when it is
bastion's, and bastion's stream is brought in step by §8.1.1.3's PATCH (the event types bastion
asks for, its push endpoint and token: `stream_fit`, `_update_stream`); the stream's subjects (§8.1.3) are the transmitter's ``users``
table and its linked accounts, added at a sign-in (`account_signed_in`) and removed at an unlink
(`change_subject`), and brought in step by rounds that one process at a time runs
(`sync_subjects`, `_hold_round`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import anyio
from joserfc.jwk import KeySet
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bastion import untrusted_json
from bastion.audit.actor import SERVER
from bastion.audit.log import AuditLog
from bastion.constant_time import same
from bastion.db import Database, round_failed
from bastion.egress import cleartext_problem, metadata_allowance
from bastion.facts.model import Entity, FactError
from bastion.facts.store import FactStore, StoredFact, check_storable
from bastion.http_caching import KeptAnswers
from bastion.http_fields import media_type
from bastion.oauth.jwks import (
    FetchLimits,
    RemoteDocumentError,
    RemoteKeySets,
    fetch,
    fetch_json_answer,
)
from bastion.oauth.remote_metadata import RemoteMetadata
from bastion.oauth.store import OAuthStore
from bastion.retries import Outage, kind_of
from bastion.signals.set_tokens import (
    SetRefused,
    VerifiedSet,
    transmitter_jwks_problem,
    unverified_kid,
    verify_set,
)
from bastion.signals.settings import (
    CAEP,
    DEFAULT_EFFECTS,
    RISC,
    STREAM_UPDATED,
    VERIFICATION,
    SsfSettings,
    Transmitter,
)
from bastion.signals.ssf_store import SsfStore, StreamSubject
from bastion.signals.subjects import (
    MAX_FIELD,
    Subject,
    SubjectError,
    identifier_of,
    parse_subject,
    user_of,
)

log = logging.getLogger("bastion.signals.ssf")

# SSF 1.0 §8.1.2.1: a stream's status.
STREAM_STATUSES = ("enabled", "paused", "disabled")
# CAEP 1.0 §2: who invoked an event.
INITIATING_ENTITIES = ("admin", "user", "policy", "system")

PUSH_PATH = "/ssf/events"
SET_MEDIA_TYPE = "application/secevent+jwt"
PUSH_METHOD = "urn:ietf:rfc:8935"
POLL_METHOD = "urn:ietf:rfc:8936"
# A transmitter's metadata, stream and poll answers larger than this are not read, nor waited
# for longer than this (the whole answer).
MAX_ANSWER_BYTES = 1_048_576
TRANSMITTERS_TABLE = "[[signals.ssf.transmitters]]"
ANSWER_SECONDS = 10.0
# How often what /readyz shows of the streams is read again from the database (`_show_forever`).
SHOWN_SECONDS = 2.0
# Add and remove subject requests (SSF 1.0 §8.1.3) made in one round of `sync_subjects`: the
# rest wait for the next round, so that a first round of many thousands neither holds the
# transmitter's rate limit nor the command for long.
MAX_SUBJECT_CALLS = 500
# Subject changes of sign-ins (`SsfReceiver.account_signed_in`) under way at once: past this, a
# sign-in's is left to the next round, so that a burst of sign-ins does not become a burst of
# tasks and requests to the transmitter.
MAX_PENDING_CHANGES = 64
# CAEP 1.0 §3.8's risk levels.
RISK_LEVELS = ("LOW", "MEDIUM", "HIGH")
IDENTIFIER_CHANGED = RISC + "identifier-changed"
# The metadata's endpoints that must be https (SSF 1.0 §7.1) before any is called.
METADATA_ENDPOINTS = ("jwks_uri", "configuration_endpoint", "status_endpoint",
                      "verification_endpoint", "add_subject_endpoint",
                      "remove_subject_endpoint")  # fmt: skip


class Replayed(Exception):  # noqa: N818 - a refusal, like SetRefused
    """A SET whose jti was received before: its effects were applied then, not again."""


class PollCut(Exception):  # noqa: N818 - the cause is the error; this carries what was done
    """A poll's SETs taken up to one that could not be stored (``__cause__``: why, the database
    away say): ``ack`` and ``errs`` of those before it, to be sent with the next poll. The one
    that failed, and those after it, are neither acknowledged nor reported: the transmitter
    delivers them again."""

    def __init__(self, ack: list[str], errs: dict[str, dict[str, str]]) -> None:
        super().__init__("a SET could not be stored")
        self.ack = ack
        self.errs = errs


@dataclass(frozen=True)
class SubjectsSync:
    """One round of `SsfReceiver.sync_subjects`: what was done, and what was not."""

    added: int = 0
    removed: int = 0
    failed: list[str] = field(default_factory=list)  # "<key>: <why>", for the command only
    note: str = ""  # why no subject was asked about, if none was

    def summary(self, recorded: dict[str, StreamSubject]) -> str:
        """The line beside the stream's status, shown to anyone (/readyz): counts and the first
        failure in bastion's words, never a subject."""
        if self.note:
            return self.note
        states = [r.state for r in recorded.values()]
        text = f"{states.count('added')} added"
        for state, words in (("add_failed", "not added"), ("remove_failed", "not removed")):
            if state in states:
                first = next(r.detail for r in recorded.values() if r.state == state)
                text += f", {states.count(state)} {words} ({first})"
        if len(states) > states.count("added"):
            text += ": bastion signals subjects status"
        return text


@dataclass(frozen=True)
class Outcome:
    """What one SET did: per event type, its effect and what happened."""

    jti: str
    user: str | None
    effects: list[dict[str, Any]] = field(default_factory=list)


def secure_url(url: Any, what: str) -> str:
    """``url`` if it is https (or http to the loopback, for tests and sidecars:
    `bastion.egress.cleartext_problem`); else ValueError."""
    problem = cleartext_problem(url)
    if problem:
        raise ValueError(f"{what} {problem}, got {url!r}")
    return url


def poll_url(stream: dict[str, Any], endpoint: str = "the transmitter") -> str:
    """The poll endpoint (RFC 8936) of a stream the transmitter answered: its delivery's
    ``endpoint_url``, https (or http to the loopback); else a ValueError, in bastion's words
    (the stream's status is shown to anyone: the URL is not quoted)."""
    delivery = stream.get("delivery")
    url = delivery.get("endpoint_url") if isinstance(delivery, dict) else None
    problem = cleartext_problem(url)
    if problem:
        raise ValueError(
            f"{endpoint} answered a stream whose poll endpoint (delivery.endpoint_url) {problem}"
            " (RFC 8936 §2); it is configured again"
        )
    return url


def event_time(verified: VerifiedSet, body: dict[str, Any]) -> float:
    """When an event happened, to order it among others: its ``event_timestamp`` (CAEP 1.0
    §2), else the SET's ``iat``; never after the ``iat`` (itself never far ahead), so that no
    event can be dated ahead to hold its value against every later one."""
    at = body.get("event_timestamp")
    if isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at):
        return verified.iat
    return min(float(at), verified.iat)


def event_reasons(body: dict[str, Any]) -> dict[str, Any]:
    """CAEP 1.0 §2's ``initiating_entity`` and ``reason_admin`` ("intended for logging and
    auditing") of an event, for its audit record: the entity if it is one of the four, at most
    8 languages of 200 characters of the reason."""
    found: dict[str, Any] = {}
    if body.get("initiating_entity") in INITIATING_ENTITIES:
        found["initiating_entity"] = body["initiating_entity"]
    reason = body.get("reason_admin")
    if isinstance(reason, dict):
        texts = {
            str(lang)[:35]: text[:200]
            for lang, text in list(reason.items())[:8]
            if isinstance(text, str)
        }
        if texts:
            found["reason_admin"] = texts
    return found


def _named(types: list[str]) -> str:
    """Event types by their last part, at most 8 (a status line, not a list)."""
    return ", ".join(e.rsplit("/", 1)[-1] for e in types[:8]) + (", ..." if len(types) > 8 else "")


@dataclass(frozen=True)
class StreamFit:
    """How a stream the transmitter holds stands against the one bastion would create (SSF 1.0
    §8.1.1), in bastion's words (the transmitter's values are not quoted: the status is shown
    to anyone). ``foreign`` says why it is not bastion's to use or change (another ``iss``,
    another delivery method); else ``patch`` holds the Receiver-Supplied members that would
    bring it in step (§8.1.1.3: each replaced whole, those not sent kept), and ``changes`` what
    each changes. Its extra event types are no difference (they are kept); an
    ``events_requested`` or ``authorization_header`` it does not show cannot be checked (for the
    latter, the verification event, pushed with it, shows it works)."""

    foreign: list[str]
    patch: dict[str, Any]
    changes: list[str]
    differences: list[str]


def stream_fit(
    stream: dict[str, Any], issuer: str, delivery: dict[str, Any], requested: list[str]
) -> StreamFit:
    foreign: list[str] = []
    differs: list[str] = []
    changes: list[str] = []
    patch: dict[str, Any] = {}
    if stream.get("iss") != issuer:
        foreign.append(f"its iss is not {issuer}")
    had = stream.get("delivery") if isinstance(stream.get("delivery"), dict) else {}
    if had.get("method") != delivery["method"]:
        foreign.append(f"its delivery method is not {delivery['method']}")
    elif delivery["method"] == PUSH_METHOD:
        if had.get("endpoint_url") != delivery["endpoint_url"]:
            differs.append(f"it does not push to {delivery['endpoint_url']}")
            changes.append(f"delivery: endpoint_url now {delivery['endpoint_url']}")
        shown = had.get("authorization_header")
        if shown is not None and not (
            isinstance(shown, str) and same(shown, delivery["authorization_header"])
        ):
            differs.append("it pushes with another authorization_header (push_token_env)")
            changes.append("delivery: authorization_header now bastion's (push_token_env)")
        if differs:
            patch["delivery"] = dict(delivery)  # one member: sent whole
    asked = stream.get("events_requested")
    asked = {e for e in asked if isinstance(e, str)} if isinstance(asked, list) else None
    missing = [e for e in requested if e not in asked] if asked is not None else []
    if asked is not None and missing:
        differs.append(f"its events_requested lacks {len(missing)} of bastion's: {_named(missing)}")
        patch["events_requested"] = sorted(asked | set(requested))
        changes.append(f"events_requested: added {_named(missing)}")
    if foreign:
        return StreamFit(foreign, {}, [], foreign + differs)
    return StreamFit([], patch, changes, differs)


@dataclass(frozen=True)
class ConfiguredStream:
    """What `SsfReceiver.configure` did: the stream as the transmitter holds it, and what bastion
    changed of it there (SSF 1.0 §8.1.1.3), in bastion's words."""

    stream: dict[str, Any]
    changed: list[str] = field(default_factory=list)


class StreamNotUpdated(ValueError):
    """bastion's own stream lacks event types bastion asks for, and the transmitter did not add
    them: the stream is used as it is (the events it does deliver, revocations among them, keep
    coming) and recorded in error with this reason; ``stream`` is it."""

    def __init__(self, message: str, stream: dict[str, Any]) -> None:
        super().__init__(message)
        self.stream = stream


def _error(status: int, err: str, description: str, **headers: str) -> JSONResponse:
    return JSONResponse({"err": err, "description": description}, status, headers=headers)


class SsfReceiver:
    """Receives, verifies and applies the SETs of the configured transmitters."""

    def __init__(
        self,
        settings: SsfSettings,
        db: Database,
        oauth_store: OAuthStore,
        facts: FactStore,
        authz: Callable[[], Any],
        clock: Callable[[], float] = time.time,
    ) -> None:
        if oauth_store.db is not db or facts.db is not db:
            # A SET's claim and its effects are one transaction (`receive`).
            raise ValueError("the SSF receiver, its OAuth store and its facts share one Database")
        self.settings = settings
        self.store = SsfStore(db)
        self.audit = AuditLog(db)
        self.oauth_store = oauth_store
        self.facts = facts
        self.authz = authz
        self.by_issuer = {t.issuer: t for t in settings.transmitters}
        # The transmitters' metadata and key sets are fetched as every remote document is
        # (`bastion.oauth.jwks`): one deadline, a size cap, no redirects; an unknown kid fetches
        # the set again at most once every jwks_refresh_seconds, and so does a failed fetch.
        self.limits = FetchLimits(
            timeout_seconds=ANSWER_SECONDS,
            max_bytes=MAX_ANSWER_BYTES,
            refetch_seconds=settings.jwks_refresh_seconds,
            max_cached=max(1, len(settings.transmitters)),
            refetch_setting="[signals.ssf] jwks_refresh_seconds",
        )
        # The configuration URL is the operator's (fetched as given); every other endpoint (the
        # key set, stream management, poll) is named by the transmitter's metadata or stream:
        # reached only where its allow_private_addresses allows (`egress.metadata_allowance`).
        self.peer_limits = {
            t.name: replace(
                self.limits,
                private_addresses=metadata_allowance(
                    t.configuration_url, t.allow_private_addresses
                ),
                private_setting=f"{TRANSMITTERS_TABLE} allow_private_addresses",
            )
            for t in settings.transmitters
        }
        self.key_sets = {
            t.name: RemoteKeySets(
                self.peer_limits[t.name],
                check=lambda document: transmitter_jwks_problem(document, settings.jwks_max_keys),
                clock=clock,
            )
            for t in settings.transmitters
        }
        # Each transmitter's metadata, read again when its lifetime ends (SSF 1.0 §7).
        self._metadata = {
            t.name: RemoteMetadata.of(
                t,
                self.limits,
                partial(self._read_metadata, t),
                table=TRANSMITTERS_TABLE,
                peer=t.name,
                clock=clock,
            )
            for t in settings.transmitters
        }
        self._tasks: list[asyncio.Task] = []
        # Rounds of each transmitter's subjects this process went through (run, or skipped
        # because another process runs them), and the sign-ins' subject changes under way.
        self.rounds: dict[str, int] = {}
        self._changes: set[asyncio.Task] = set()
        # What the log says of a step of a transmitter's that keeps failing (`_outage`).
        self._outages: dict[tuple[str, str], Outage] = {}
        # Transmitter name -> the id of the stream this process made there and could not yet
        # record (the database away): `configure` reads it again rather than make another.
        self._unrecorded: dict[str, str] = {}
        # This process, as the holder of the rounds of a stream's subjects (`take_round`).
        self.owner = secrets.token_hex(8)
        if any(t.linked_accounts for t in settings.transmitters):
            from bastion.identity.accounts import MIGRATIONS as IDENTITY_MIGRATIONS

            # Read here (linked accounts) before any sign-in may have made them.
            db.migrate("identity", IDENTITY_MIGRATIONS)

    # -- the transmitter's metadata and keys (on the event loop) -----------------------------

    async def metadata(self, t: Transmitter) -> dict[str, Any]:
        """The transmitter's configuration metadata (SSF 1.0 §7), checked; read again when its
        lifetime ends, the last good one kept through a short outage or a refused document
        (`RemoteMetadata`): the SETs that need it meanwhile wait for one read, and one that
        failed is not tried again for jwks_refresh_seconds (each SET pushed fetched it again,
        as many at once as came). A ValueError when none can be used."""
        try:
            return await self._metadata[t.name].get()
        except RemoteDocumentError as e:
            raise ValueError(f"{t.configuration_url} {e}") from None

    async def _read_metadata(
        self, t: Transmitter, answers: KeptAnswers
    ) -> tuple[dict[str, Any], float | None]:
        """The transmitter's metadata, each check passed, and the lifetime its headers give;
        `RemoteDocumentError` for one that cannot be had or fails a check (it never replaces a
        good one)."""
        found, lifetime = await fetch_json_answer(t.configuration_url, self.limits, None, answers)
        try:
            if not isinstance(found, dict) or found.get("issuer") != t.issuer:
                raise ValueError(
                    f"names issuer {found.get('issuer')!r} where {t.issuer!r} is configured"
                    if isinstance(found, dict)
                    else "is not a JSON object"
                )
            for key in METADATA_ENDPOINTS:
                if key in found:
                    secure_url(found[key], key)
        except ValueError as e:
            # A wrong answer is a failure as one not had is: remembered, not asked per SET.
            raise RemoteDocumentError(str(e)) from None
        return found, lifetime

    async def keys(self, t: Transmitter, token: str) -> KeySet:
        """The key set of ``t`` holding the SET's kid; `SetRefused` (``invalid_key``) when it
        cannot be had."""
        kid = unverified_kid(token)
        try:
            jwks_uri = (await self.metadata(t)).get("jwks_uri")
            if not isinstance(jwks_uri, str):
                raise ValueError(f"{t.configuration_url} has no jwks_uri")
            return await self.key_sets[t.name].keys(jwks_uri, kid)
        except (ValueError, RemoteDocumentError) as e:
            raise SetRefused(
                "invalid_key", f"the transmitter's JWKS could not be read: {e}"
            ) from None

    async def accept(self, t: Transmitter, token: str) -> Outcome:
        """Fetch the keys of one SET of ``t`` here, then verify and apply it in a worker thread
        (`receive`); a SET whose keys cannot be had is refused and recorded as any other."""
        try:
            keys = await self.keys(t, token)
        except SetRefused as e:
            await anyio.to_thread.run_sync(self._refused, t, e)
            raise
        return await anyio.to_thread.run_sync(self.receive, t, token, keys)

    def _refused(self, t: Transmitter, e: SetRefused) -> None:
        self.audit.record(
            "signal.refused", transmitter=t.name, issuer=t.issuer, err=e.err,
            description=e.description,
        )  # fmt: skip

    # -- receiving (worker threads) ----------------------------------------------------------

    def receive(self, t: Transmitter, token: str, keys: KeySet) -> Outcome:
        """Verify one SET of ``t`` with its key set and apply it; `SetRefused`, or `Replayed`
        for a jti seen."""
        try:
            verified = verify_set(
                token,
                keys=keys,
                issuer=t.issuer,
                audience=t.audience,
                algorithms=self.settings.algorithms,
                clock_skew_seconds=self.settings.clock_skew_seconds,
                max_age_seconds=self.settings.max_event_age_seconds,
            )
        except SetRefused as e:
            self._refused(t, e)
            raise
        now = time.time()
        # The jti's claim, the effects (grants revoked, a user disabled, facts written, the
        # stream's state) and the record are one transaction on one database: a SET is applied
        # whole and its jti claimed, or nothing of it is kept and its redelivery applies it. A
        # claim committed first was released only by a handler, so a process killed under the
        # effects left the jti claimed and the redelivery refused as a replay: lost for good.
        # Another replica's claim of the same jti waits for this one's transaction to end.
        with self.store.db.transaction():
            claimed = self.store.claim(t.issuer, verified.jti, now)
            if claimed:
                outcome = self._apply(t, verified, now)
                self.audit.record(
                    "signal.received",
                    subject=outcome.user,
                    transmitter=t.name,
                    issuer=t.issuer,
                    jti=verified.jti,
                    txn=verified.txn,
                    events=list(verified.events),
                    effects=outcome.effects,
                )
        if not claimed:
            self.audit.record(
                "signal.refused", transmitter=t.name, issuer=t.issuer, jti=verified.jti,
                err="invalid_request", description="replayed jti",
            )  # fmt: skip
            raise Replayed(verified.jti)
        return outcome

    def _subject(self, verified: VerifiedSet, body: dict[str, Any]) -> Subject:
        # SSF 1.0 puts sub_id in the SET; CAEP's earlier drafts put "subject" in the event.
        raw = verified.sub_id if verified.sub_id is not None else body.get("subject")
        if raw is None:
            raise SubjectError("the SET names no subject (sub_id)")
        return parse_subject(raw)

    def _apply(self, t: Transmitter, verified: VerifiedSet, now: float) -> Outcome:
        effects: list[dict[str, Any]] = []
        users: set[str] = set()
        for event_type, body in verified.events.items():
            done: dict[str, Any] = {"event": event_type, **event_reasons(body)}
            effects.append(done)
            if event_type in (VERIFICATION, STREAM_UPDATED):
                done.update(self._stream_event(t, event_type, verified, body))
                continue
            effect = t.effect(event_type)
            done["effect"] = effect
            if event_type not in DEFAULT_EFFECTS and event_type not in t.effects:
                done["result"] = "unknown event type: recorded and ignored"
                continue
            try:
                subject = self._subject(verified, body)
                done["subject"] = subject.describe()
                linked = (
                    self.store.linked_users(t.linked_accounts, t.linked_issuer, subject.user_keys)
                    if t.linked_accounts
                    else None
                )
                user = user_of(subject, t.users, linked)
            except SubjectError as e:
                done["result"] = f"ignored: {e}"
                continue
            if user is not None:
                users.add(user)
                done["user"] = user
            not_understood = self._critical_unread(t, effect, subject)
            if not_understood and effect == "fact":
                # SSF 1.0 §3.6: discarded. A value about a tenant, an application or a session
                # is not the user's or the device's, which is all a fact here can be about.
                done["result"] = (
                    f"ignored: critical subject member(s) {', '.join(not_understood)} not"
                    " understood (SSF 1.0 §3.6)"
                )
                continue
            if not_understood:
                # A revocation or a disabling is applied to the whole user (fail closed): more
                # than the member named, never less.
                done["critical_not_understood"] = not_understood
            if effect == "record" and event_type == IDENTIFIER_CHANGED:
                done["result"] = self._identifier_changed(subject, body, user)
            elif effect == "record":
                done["result"] = "recorded"
            elif effect == "fact":
                done["result"] = self._facts(
                    t, event_type, body, subject, user, event_time(verified, body)
                )
            elif user is None:
                done["result"] = "ignored: the subject maps to no user (signals.ssf users table)"
            elif effect == "revoke":
                count = self.revoke_user(
                    user, now, f"ssf {t.name}: {event_type.rsplit('/', 1)[-1]}", t.name
                )
                done["result"] = f"revoked {count} grant(s)"
            elif effect == "disable":
                disabled = self.oauth_store.disable_user(user, now, actor=f"ssf:{t.name}")
                count = self.revoke_user(
                    user, now, f"ssf {t.name}: {event_type.rsplit('/', 1)[-1]}", t.name
                )
                done["result"] = ("disabled" if disabled else "already disabled") + (
                    f", revoked {count} more grant(s)" if count else ""
                )
        return Outcome(verified.jti, ",".join(sorted(users)) or None, effects)

    @staticmethod
    def _identifier_changed(subject: Subject, body: dict[str, Any], user: str | None) -> str:
        """RISC 1.0 identifier-changed: recorded with what the mapping would need, and the
        mapping left as it is. The users table is the operator's word, and a transmitter that
        could move a user's identifier could give that user's events to whoever holds the
        new one; the old identifier keeps naming the user until the operator changes it."""
        old = subject.user_keys[0] if len(subject.user_keys) == 1 else None
        fmt = old.partition(":")[0] if old else None
        if fmt not in ("email", "phone_number"):
            return "ignored: identifier-changed names one email or phone_number subject (RISC 1.0)"
        new = body.get("new-value")
        if not isinstance(new, str) or not new or len(new) > MAX_FIELD:
            return "recorded: the identifier changed, and the event names no new-value"
        new_key = f"{fmt}:{new}"
        if user is None:
            return f"recorded: {old} changed to {new_key}; it maps to no user"
        return (
            f"recorded, not applied: {old} of {user} changed to {new_key}; bastion does not"
            f' remap on a transmitter\'s word: add "{new_key}" = "{user}" to the users table'
        )

    def _critical_unread(self, t: Transmitter, effect: str, subject: Subject) -> list[str]:
        """The members of the subject named critical by the transmitter's metadata
        (``critical_subject_members``, SSF 1.0 §7.1) that this effect does not act on: members
        not read, a session for a fact (facts are the user's or the device's), a device for a
        transmitter that does not speak for devices."""
        critical = (self._metadata[t.name].last_good or {}).get("critical_subject_members")
        if not isinstance(critical, list) or not critical:
            return []
        unread = set(subject.unread)
        if effect == "fact":
            unread |= {"session"} if subject.session is not None else set()
            unread |= {"device"} if subject.device is not None and not t.devices else set()
        return sorted(m for m in unread if m in critical)

    def _stream_event(
        self, t: Transmitter, event_type: str, verified: VerifiedSet, body: dict[str, Any]
    ) -> dict[str, str]:
        """A verification (SSF 1.0 §8.1.4.1) or stream-updated (§8.1.5) event: about the stream
        whose id its sub_id (``opaque``) names, which must be bastion's with ``t``."""
        known = self.store.stream(t.name)
        sub = verified.sub_id
        named = sub.get("id") if isinstance(sub, dict) and sub.get("format") == "opaque" else None
        if known is None or not known.stream_id or named != known.stream_id:
            return {
                "effect": "record",
                "result": f"ignored: sub_id names stream {str(named)[:64]!r}, not this stream",
            }
        actor = f"ssf:{t.name}"
        if event_type == VERIFICATION:
            state = body.get("state")
            matched = self.store.verified(
                t.name, state if isinstance(state, str) else None, actor=actor
            )
            return {"effect": "verify", "result": "verified" if matched else "unexpected state"}
        status = body.get("status")
        if status not in STREAM_STATUSES:
            return {
                "effect": "record",
                "result": f"ignored: status must be one of {', '.join(STREAM_STATUSES)}",
            }
        self.store.save_stream(t.name, status, "stream-updated event", actor=actor)
        done = {"effect": "record", "result": f"stream {status}"}
        reason = body.get("reason")
        if isinstance(reason, str) and reason:
            # In the audit event only: the stream's detail is shown to anyone (/readyz), and is
            # never the transmitter's words.
            done["reason"] = reason[:200]
        return done

    def revoke_user(self, username: str, now: float, reason: str, transmitter: str) -> int:
        """Revoke the user's grants on a signal of ``transmitter``, recorded in the receiving
        transaction (actor ``ssf:<transmitter>``)."""
        return self.oauth_store.revoke_user_grants(
            username, now, reason, actor=f"ssf:{transmitter}"
        )

    def _facts(
        self,
        t: Transmitter,
        event_type: str,
        body: dict[str, Any],
        subject: Subject,
        user: str | None,
        at: float,
    ) -> str:
        """Write the event's values as facts, each replacing the value before it unless an
        event that happened after ``at`` set that one (events arrive out of order: a push
        retried, a poll queue): a device found compliant, delivered after it was found not
        compliant, must not be compliant again."""
        entities = [Entity("User", user)] if user is not None else []
        skipped: list[str] = []
        if subject.device is not None and t.devices:
            entities.append(Entity("Device", subject.device))
        elif subject.device is not None:
            skipped.append(
                f"Device{{{subject.device!r}}}: transmitter {t.name} does not speak for devices"
                f" ({TRANSMITTERS_TABLE} devices = true)"
            )
        if not entities:
            return "ignored: the subject maps to no user or device" + "".join(
                f"; {s}" for s in skipped
            )
        values: list[tuple] = []  # each fact with its last term as the new value
        name = event_type.removeprefix(CAEP)
        for entity in entities:
            if name == "device-compliance-change":
                status = body.get("current_status")
                if status not in ("compliant", "not-compliant"):
                    return "ignored: current_status must be compliant or not-compliant"
                values.append(("device_compliance", entity, status))
            elif name == "assurance-level-change":
                level = body.get("current_level")
                if not isinstance(level, str) or not level or len(level) > 128:
                    return "ignored: current_level must be a string"
                values.append(("assurance_level", entity, level))
            elif name == "risk-level-change":
                level, principal = body.get("current_level"), body.get("principal")
                if level not in RISK_LEVELS:
                    return "ignored: current_level must be LOW, MEDIUM or HIGH (CAEP 1.0 §3.8)"
                if principal not in ("USER", "DEVICE"):
                    # A session's, a tenant's or a group's risk is not its user's.
                    return (
                        f"ignored: principal {str(principal)[:32]!r} is not USER or DEVICE: only"
                        " a user's or a device's risk level is written (CAEP 1.0 §3.8)"
                    )
                if entity.type == principal.title():
                    values.append(("risk_level", entity, level))
            elif name == "token-claims-change":
                claims = body.get("claims")
                if not isinstance(claims, dict) or not claims:
                    return "ignored: claims must be an object"
                for claim, value in list(claims.items())[:32]:
                    if isinstance(value, (str, bool, int)) and len(str(value)) <= 512:
                        values.append(("token_claim", entity, claim, value))
        if not values and name == "risk-level-change":
            return "ignored: the event's principal is not among the subject's user and device"
        authz = self.authz()
        kept = []
        for fact in values:
            try:
                authz.facts.validate(fact)
                check_storable(fact)
            except FactError as e:
                skipped.append(str(e))
                continue
            if not self.store.take_value(fact[:-1], at):
                skipped.append(f"{fact[0]}{fact[1:-1]}: the event is older than the one in force")
                continue
            kept.append(fact)
        if not kept:
            return "skipped: " + "; ".join(skipped)
        expires = time.time() + t.fact_expiry_seconds if t.fact_expiry_seconds > 0 else None
        # Each value replaces its own earlier one only: a value skipped keeps the one in force.
        result = self.facts.apply(
            [StoredFact(f, expires) for f in kept],
            [(*f[:-1], None) for f in kept],
            actor=f"ssf:{t.name}",
        )
        text = f"wrote {len(kept)} fact(s) at seq {result.seq}"
        return text + ("; skipped: " + "; ".join(skipped) if skipped else "")

    # -- push (RFC 8935) ------------------------------------------------------------------------

    def _pusher(self, authorization: str) -> Transmitter | None:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        found = None
        for t in self.settings.transmitters:
            if t.delivery == "push" and same(t.push_token, token.strip()):
                found = t
        return found

    async def push(self, request: Request) -> Response:
        """``POST /ssf/events``: one SET, answered 202, or 400/401 with RFC 8935's err."""
        t = self._pusher(request.headers.get("authorization", ""))
        if t is None:
            return _error(
                401,
                "authentication_failed",
                "send the stream's bearer token (its authorization_header) in Authorization",
                **{"WWW-Authenticate": 'Bearer realm="ssf"'},
            )
        if media_type(request.headers.get("content-type", "")) != SET_MEDIA_TYPE:
            return _error(400, "invalid_request", f"Content-Type must be {SET_MEDIA_TYPE}")
        # Capped while it arrives (64 KiB, `PUSH_PATH` in bastion.server.app.body_limits), in
        # front of this route, by bastion.server.request_limits.
        body = await request.body()
        try:
            token = body.decode("ascii").strip()
        except UnicodeDecodeError:
            return _error(400, "invalid_request", "a SET is ASCII (a compact JWS)")
        try:
            await self.accept(t, token)
        except SetRefused as e:
            return _error(400, e.err, e.description)
        except Replayed:
            return _error(400, "invalid_request", "this jti was received before (replay refused)")
        return Response(status_code=202)

    def routes(self) -> list[Route]:
        return [Route(PUSH_PATH, self.push, methods=["POST"])]

    # -- stream management (SSF 1.0 §8) and poll (RFC 8936), on the event loop -----------------

    async def start(self) -> None:
        for t in self.settings.transmitters:
            if t.devices is None:
                # Before devices = true was asked for, every transmitter set devices' facts: an
                # MDM configured then no longer does, which its operator must hear of.
                log.warning(
                    "ssf transmitter %s: devices is not set, so the devices its SETs name are"
                    " ignored; set devices = true in %s if it manages devices (an MDM),"
                    " devices = false otherwise",
                    t.name,
                    TRANSMITTERS_TABLE,
                )
            self._tasks.append(asyncio.create_task(self._run(t), name=f"ssf {t.name}"))
        self._tasks.append(asyncio.create_task(self._forget_forever(), name="ssf jti retention"))
        self._tasks.append(asyncio.create_task(self._show_forever(), name="ssf streams shown"))

    async def close(self) -> None:
        for task in [*self._tasks, *self._changes]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()

    async def _forget_forever(self) -> None:
        """Forget the jtis received longer than ``jti_retention_seconds`` ago, every tenth of
        it (at most hourly). A round that fails is said once for as long as it fails the same
        way (`round_failed`), and once that a round works again: the jtis wait for it."""
        outage = Outage(log)
        while True:
            cutoff = time.time() - self.settings.jti_retention_seconds
            try:
                await anyio.to_thread.run_sync(self.store.forget_before, cutoff)
            except Exception as e:  # noqa: BLE001 - the next round forgets them
                round_failed(outage, e, "ssf: the jtis past jti_retention_seconds not forgotten")
            else:
                outage.ended("ssf: the jtis past jti_retention_seconds are forgotten again")
            await asyncio.sleep(min(3600.0, self.settings.jti_retention_seconds / 10))

    async def _show_forever(self) -> None:
        """Every `SHOWN_SECONDS`, what /readyz shows of each stream read again from the
        database (`SsfStore.show_streams`): another process may have changed it (a replica, the
        transmitter's event applied there, `streams configure`). A round that fails leaves
        what is shown, said once for as long as it fails the same way."""
        outage = Outage(log)
        names = frozenset(t.name for t in self.settings.transmitters)
        while True:
            await asyncio.sleep(SHOWN_SECONDS)
            try:
                await anyio.to_thread.run_sync(self.store.show_streams, names)
            except Exception as e:  # noqa: BLE001 - shown as this process last saw them
                round_failed(outage, e, "ssf: /readyz shows the streams as this process saw them")
            else:
                outage.ended("ssf: /readyz shows the streams as recorded again")

    def _outage(self, t: Transmitter, step: str) -> Outage:
        """What the log says of ``step`` of ``t``'s failing again and again: one `Outage` per
        transmitter and step, whichever round or command takes the step."""
        return self._outages.setdefault((t.name, step), Outage(log))

    async def _run(self, t: Transmitter) -> None:
        """Configure the stream until it is configured, then (poll delivery) poll for ever. A
        failure is noted in the stream's status at every attempt, and logged once for as long
        as it stays the same, and once that the stream is configured."""
        outage = Outage(log)
        while True:
            try:
                stream = (await self.configure(t)).stream
                break
            except StreamNotUpdated as e:
                stream = e.stream  # used as it is; its error recorded
                break
            except Exception as e:  # noqa: BLE001 - any failure is reported and retried
                message = f"stream not configured: {e}"[:500]
                outage.failed(
                    "ssf transmitter %s: %s", t.name, message, kind=kind_of(e), level=logging.ERROR
                )
                # Not configured: a verification asked for before verifies nothing now.
                await self._note(t, "error", message, forget_verification=True)
                await asyncio.sleep(t.poll_interval_seconds)
        outage.ended("ssf transmitter %s: stream configured again", t.name)
        # `configure` recorded the stream's status: a failure to record it before, said once,
        # is over (else the next outage's would go unsaid, taken for the same one).
        self._outage(t, "status").ended("ssf transmitter %s: its status is recorded again", t.name)
        self._tasks.append(
            asyncio.create_task(self._sync_forever(t), name=f"ssf {t.name} subjects")
        )
        if t.delivery == "poll":
            await self._poll_forever(t, stream)

    async def _note(
        self, t: Transmitter, status: str, detail: str, *, forget_verification: bool = False
    ) -> None:
        """Record the stream's status (`SsfStore.save_stream`); a database that cannot take it
        now is logged (once for as long as it cannot: `round_failed`), and the stream's task
        goes on (it stopped for good before, and no signal came in after)."""
        outage = self._outage(t, "status")
        try:
            await anyio.to_thread.run_sync(
                lambda: self.store.save_stream(
                    t.name, status, detail, forget_verification=forget_verification, actor=SERVER
                )
            )
        except Exception as e:  # noqa: BLE001 - the status is noted again at the next change
            round_failed(outage, e, f"ssf transmitter {t.name}: its status could not be recorded")
        else:
            outage.ended("ssf transmitter %s: its status is recorded again", t.name)

    async def _call(
        self, t: Transmitter, method: str, url: str, *, json_body: Any = None, params=None
    ) -> tuple[int, bytes]:
        """A request to an endpoint the transmitter's metadata or stream names, made as every
        fetch is (`bastion.oauth.jwks.fetch`) and only where its ``allow_private_addresses``
        allows: its answer's status and body, the whole of it within `ANSWER_SECONDS` and
        `MAX_ANSWER_BYTES`; a ValueError past either, or when it cannot be had."""
        headers = {"authorization": f"Bearer {t.bearer}"} if t.bearer else {}
        try:
            return await fetch(
                method, url, self.peer_limits[t.name], headers=headers, json=json_body,
                params=params,
            )  # fmt: skip
        except RemoteDocumentError as e:
            raise ValueError(f"{url} {e}") from None

    async def configure(self, t: Transmitter, actor: str = SERVER) -> ConfiguredStream:
        """Read the transmitter's metadata, read or create bastion's stream, bring it in step
        (`_update_stream`), ask it to verify; the change is audited as ``actor``'s (the server's
        at start, an administrator's from ``bastion signals streams configure``). A ValueError
        when no stream can be used; `StreamNotUpdated` when bastion's is used as it is."""
        meta = await self.metadata(t)
        endpoint = meta.get("configuration_endpoint")
        if not isinstance(endpoint, str):
            raise ValueError(f"{t.configuration_url} has no configuration_endpoint")
        delivery: dict[str, Any] = (
            {
                "method": PUSH_METHOD,
                "endpoint_url": self.settings.push_url,
                "authorization_header": f"Bearer {t.push_token}",
            }
            if t.delivery == "push"
            else {"method": POLL_METHOD}
        )
        requested = sorted({*DEFAULT_EFFECTS, *t.effects})
        known = await anyio.to_thread.run_sync(self.store.stream, t.name)
        known_id = known.stream_id if known is not None else None
        # One this process made whose id the database did not take (it went away): a stream
        # made again would leave it, holding the events queued for bastion, unpolled.
        known_id = known_id or self._unrecorded.get(t.name)
        stream = None
        if known_id:
            code, content = await self._call(t, "GET", endpoint, params={"stream_id": known_id})
            if code == 200:
                stream = untrusted_json.loads(content)
            elif code not in (404, 410):
                # SSF 1.0 §8.1.1.2: a 404 says the stream is not there (410 Gone, too). Any
                # other failure (a transmitter down for a moment) made a second stream, and the
                # first, no longer polled, kept the events queued for bastion: lost.
                raise ValueError(
                    f"reading the stream {known_id} at {endpoint} answered HTTP {code}"
                )
        else:
            # None recorded: a first start, or a process that stopped between making a stream
            # and recording its id (or a database lost). A transmitter that allows many streams
            # per receiver may hold the one bastion made: used, not made a second time (the
            # first would be left holding, or pushing, the events meant for bastion).
            stream = await self._listed_stream(t, endpoint, delivery, requested)
        if stream is None:
            code, content = await self._call(
                t,
                "POST",
                endpoint,
                json_body={"delivery": delivery, "events_requested": requested,
                           "description": "bastion"},
            )  # fmt: skip
            if code == 409:
                # SSF 1.0 §8.1.1.1: the transmitter allows one stream per receiver, and has one
                # (the database that knew its id was lost or is another replica's).
                stream = await self._existing_stream(t, endpoint, delivery, requested)
            elif code not in (200, 201):
                # Its status alone: the transmitter's words may carry a secret or forge a line
                # of the log, and the stream's status is shown to anyone (/readyz).
                raise ValueError(f"creating the stream at {endpoint} answered HTTP {code}")
            else:
                stream = untrusted_json.loads(content)
                if isinstance(stream, dict) and isinstance(stream.get("stream_id"), str):
                    self._unrecorded[t.name] = stream["stream_id"]  # until it is recorded
        if not isinstance(stream, dict) or not isinstance(stream.get("stream_id"), str):
            raise ValueError(f"{endpoint} answered no stream_id")
        if stream.get("iss") != t.issuer:
            # SSF 1.0 §8.1.1.1, §8.1.1.2: the Receiver MUST confirm it; a stream of another
            # issuer (and the poll endpoint it names) is not used.
            raise ValueError(
                f"{endpoint} answered a stream whose iss is not {t.issuer!r} (SSF 1.0 §8.1.1)"
            )
        stream_id = stream["stream_id"]
        fit = stream_fit(stream, t.issuer, delivery, requested)
        if fit.foreign:
            # The stream known by its id, of another delivery method than the one configured:
            # not turned into another (nor a push stream's endpoint polled).
            raise ValueError(
                f"the stream {stream_id} at {endpoint} is not the one bastion would create: "
                + "; ".join(fit.differences)
                + "; delete it at the transmitter, then bastion signals streams configure"
            )
        changed: list[str] = []
        refused = ""
        if fit.patch:
            stream, changed, refused = await self._update_stream(
                t, endpoint, stream, fit, delivery, requested, actor
            )
        if refused:
            message = (
                f"the stream {stream_id} at {endpoint} is not in step: "
                + "; ".join(fit.differences)
                + f"; {refused}; update it at the transmitter, then bastion signals streams"
                " configure"
            )[:500]
            if "delivery" in fit.patch:
                raise ValueError(message)  # its SETs go elsewhere: not used
        if t.delivery == "poll":
            # Checked before the stream is used: one whose poll endpoint cannot be polled is
            # refused here, and configured again, where taken it ended the poll loop for good
            # (no signal came in until a restart).
            poll_url(stream, endpoint)
        if t.audience not in (
            stream.get("aud") if isinstance(stream.get("aud"), list) else [stream.get("aud")]
        ):
            log.warning("ssf transmitter %s: the stream's aud does not hold %s", t.name, t.audience)
        status, unread = "enabled", ""
        status_endpoint = meta.get("status_endpoint")
        if isinstance(status_endpoint, str):
            code, content = await self._call(
                t, "GET", status_endpoint, params={"stream_id": stream_id}
            )
            said = untrusted_json.loads(content) if code == 200 else None
            told = said.get("status") if isinstance(said, dict) else None
            # Only a status SSF 1.0 §8.1.2 defines: one of bastion's own words ("verified",
            # "error") or free text (a line break, a terminal's escape) is never shown as the
            # stream's, nor is a status bastion could not read.
            if told in STREAM_STATUSES:
                status = told
            else:
                status = "unknown"
                unread = (
                    f"; its status endpoint answered HTTP {code}"
                    if code != 200
                    else "; its status endpoint named no status of SSF's"
                )
        if meta.get("default_subjects") == "NONE" and "add_subject_endpoint" not in meta:
            # SSF 1.0 §7.1: such a transmitter sends events only about subjects added to the
            # stream, and gives bastion no way to add them (the subjects' status says so too).
            log.warning(
                "ssf transmitter %s: its default_subjects is NONE and it has no"
                " add_subject_endpoint: add the subjects at the transmitter, or no events will"
                " come", t.name,
            )  # fmt: skip
        if refused:
            # Used as it is, and shown in error until it is in step: no verification asked,
            # and none asked before awaited, whose event would mark it verified.
            log.error("ssf transmitter %s: %s", t.name, message)
            await anyio.to_thread.run_sync(
                lambda: self.store.save_stream(
                    t.name, "error", message, stream_id=stream_id, forget_verification=True,
                    actor=actor,
                )
            )  # fmt: skip
            self._unrecorded.pop(t.name, None)
            raise StreamNotUpdated(message, stream)
        state = secrets.token_urlsafe(16)
        detail = "stream configured; verification requested" + unread
        await anyio.to_thread.run_sync(
            lambda: self.store.save_stream(
                t.name, status, detail, stream_id=stream_id, verification_state=state,
                actor=actor,
            )
        )  # fmt: skip
        self._unrecorded.pop(t.name, None)
        verification = meta.get("verification_endpoint")
        if isinstance(verification, str):
            code, _ = await self._call(
                t, "POST", verification, json_body={"stream_id": stream_id, "state": state}
            )
            if code not in (200, 204):
                log.warning(
                    "ssf transmitter %s: verification request answered HTTP %s", t.name, code
                )
        log.info("ssf transmitter %s: stream %s %s", t.name, stream_id, status)
        return ConfiguredStream(stream, changed)

    async def _update_stream(
        self,
        t: Transmitter,
        endpoint: str,
        stream: dict[str, Any],
        fit: StreamFit,
        delivery: dict[str, Any],
        requested: list[str],
        actor: str,
    ) -> tuple[dict[str, Any], list[str], str]:
        """Bring bastion's stream in step by SSF 1.0 §8.1.1.3's PATCH: ``stream_id`` and the
        members that differ (`StreamFit.patch`), nothing else; the answer must be the whole
        stream, of ``t``'s issuer ("the Receiver MUST check the response and confirm that the
        iss value matches"), now the one bastion would create. The change is audited at once
        (``ssf.stream_changed`` naming it). Returns (the stream as the transmitter holds it,
        what changed, why it is not in step: empty when it is). SSF 1.0's metadata names no
        methods of the configuration endpoint: PATCH is asked of every transmitter, and one
        that has none answers it so (405), which is said as any refusal. No PUT (§8.1.1.4)
        after it: a replacement drops every member not sent."""
        stream_id = stream["stream_id"]
        code, content = await self._call(
            t, "PATCH", endpoint, json_body={"stream_id": stream_id, **fit.patch}
        )
        if code == 202:
            # §8.1.1.3: accepted, not processed; the same request later has the result.
            why = f"updating it at {endpoint} answered HTTP 202 (accepted, not applied yet)"
            return stream, [], why + ": asked again at the next configure"
        if code != 200:
            return stream, [], f"updating it at {endpoint} answered HTTP {code}"
        answer = untrusted_json.loads(content)
        if not isinstance(answer, dict) or answer.get("stream_id") != stream_id:
            return stream, [], f"updating it at {endpoint} answered no stream {stream_id}"
        now = stream_fit(answer, t.issuer, delivery, requested)
        if now.differences:
            why = f"updating it at {endpoint} answered a stream that still differs: "
            return stream, [], why + "; ".join(now.differences)
        delivered = answer.get("events_delivered")
        # §8.1.1: events_delivered is what the transmitter sends of those asked for and it
        # supports; one it does not support no update can bring, so it is said, not an error.
        not_delivered = (
            [e for e in requested if e not in delivered] if isinstance(delivered, list) else []
        )
        if not_delivered:
            log.warning(
                "ssf transmitter %s: the stream does not deliver %d of bastion's event types: %s",
                t.name, len(not_delivered), _named(not_delivered),
            )  # fmt: skip
        await anyio.to_thread.run_sync(
            partial(
                self.store.stream_updated, t.name, stream_id, fit.changes,
                not_delivered=_named(not_delivered) if not_delivered else None, actor=actor,
            )
        )  # fmt: skip
        log.info("ssf transmitter %s: stream %s updated: %s", t.name, stream_id,
                 "; ".join(fit.changes))  # fmt: skip
        return answer, fit.changes, ""

    async def _streams_listed(
        self, t: Transmitter, endpoint: str
    ) -> tuple[int, list[dict[str, Any]]]:
        """The transmitter's streams for bastion (SSF 1.0 §8.1.1.2: its configuration endpoint
        read without a ``stream_id``), those with an id, and the HTTP status of that read (no
        stream unless 200)."""
        code, content = await self._call(t, "GET", endpoint)
        if code != 200:
            return code, []
        found = untrusted_json.loads(content)
        listed = found if isinstance(found, list) else [found]
        return code, [
            s for s in listed if isinstance(s, dict) and isinstance(s.get("stream_id"), str)
        ]

    async def _listed_stream(
        self, t: Transmitter, endpoint: str, delivery: dict[str, Any], requested: list[str]
    ) -> dict[str, Any] | None:
        """The first stream of the transmitter's list that is the one bastion would create for
        ``t`` (`stream_fit`: nothing differs), if it lists its streams; else None."""
        _, listed = await self._streams_listed(t, endpoint)
        for stream in listed:
            if not stream_fit(stream, t.issuer, delivery, requested).differences:
                log.info("ssf transmitter %s: using the stream it holds for bastion", t.name)
                return stream
        return None

    async def _existing_stream(
        self, t: Transmitter, endpoint: str, delivery: dict[str, Any], requested: list[str]
    ) -> dict[str, Any]:
        """The stream the transmitter holds for bastion (read from its list, SSF 1.0 §8.1.1.2):
        the first that is the one bastion would create, else the first that is bastion's to
        bring in step (of ``t``'s issuer and its delivery method: `StreamFit`), which
        `configure` updates. Else a ValueError naming what differs, in bastion's words (the
        transmitter's values are not quoted: the status is shown to anyone)."""
        code, listed = await self._streams_listed(t, endpoint)
        if code != 200:
            raise ValueError(
                f"creating the stream at {endpoint} answered 409 (one stream per receiver, SSF"
                f" 1.0 §8.1.1.1) and reading the existing one answered HTTP {code}"
            )
        differences: list[list[str]] = []
        ours: dict[str, Any] | None = None
        for stream in listed:
            fit = stream_fit(stream, t.issuer, delivery, requested)
            if not fit.differences:
                log.info(
                    "ssf transmitter %s: using the stream it holds for bastion (create answered"
                    " 409)", t.name,
                )  # fmt: skip
                return stream
            if not fit.foreign and ours is None:
                ours = stream
            differences.append(fit.differences)
        if ours is not None:
            return ours
        if not differences:
            raise ValueError(
                f"creating the stream at {endpoint} answered 409 (one stream per receiver, SSF"
                " 1.0 §8.1.1.1) and its list of streams holds none"
            )
        raise ValueError(
            f"creating the stream at {endpoint} answered 409 (one stream per receiver, SSF 1.0"
            " §8.1.1.1) and the stream it holds is not bastion's to use or change: "
            + "; ".join(min(differences, key=len))
            + "; delete it at the transmitter, then bastion signals streams configure"
        )

    # -- subjects (SSF 1.0 §8.1.3), on the event loop ------------------------------------------

    def wanted_subjects(self, t: Transmitter) -> dict[str, str]:
        """The subjects ``t``'s stream should carry, {key: user}: its users table's and, with
        ``linked_accounts``, the accounts of that provider linked to users. A worker thread's."""
        wanted = dict(t.users)
        if t.linked_accounts:
            for key, user in self.store.linked_accounts(t.linked_accounts, t.linked_issuer).items():
                wanted.setdefault(key, user)
        return wanted

    async def _subject_endpoints(self, t: Transmitter) -> tuple[str, str | None, str | None, str]:
        """(the stream's id, add_subject_endpoint, remove_subject_endpoint, why none is asked):
        the endpoints are None, and the reason said, with ``default_subjects`` "ALL" or no
        add endpoint; ValueError before the stream is configured."""
        meta = await self.metadata(t)
        known = await anyio.to_thread.run_sync(self.store.stream, t.name)
        if known is None or not known.stream_id:
            raise ValueError("the stream is not configured yet")
        add, remove = meta.get("add_subject_endpoint"), meta.get("remove_subject_endpoint")
        default = meta.get("default_subjects")
        note = ""
        if default == "ALL":
            note = "default_subjects is ALL: every subject is sent, none added"
        elif not isinstance(add, str):
            note = "the transmitter has no add_subject_endpoint" + (
                ": its default_subjects is NONE, so no events will come"
                if default == "NONE"
                else ""
            )
        if note:
            return known.stream_id, None, None, note
        return known.stream_id, add, remove if isinstance(remove, str) else None, ""

    async def sync_subjects(
        self,
        t: Transmitter,
        actor: str = SERVER,
        keep: Callable[[], Awaitable[bool]] | None = None,
    ) -> SubjectsSync:
        """Bring the subjects of ``t``'s stream in step with `wanted_subjects`: add each not on
        it, remove each bastion added that is no longer wanted, and try again those that failed.
        Only a 2xx answer (404 too for a removal: the subject is not on the stream) changes
        what is recorded; any other is recorded as the subject's failure, audited, shown in
        the stream's status, and tried again next round. With ``default_subjects`` "ALL" nothing
        is added (every subject is sent already). ``keep``, asked before each request, ends the
        round when it answers False (another process took the rounds over)."""
        stream_id, add, remove, note = await self._subject_endpoints(t)
        if add is None:
            return SubjectsSync(note=note)
        # What is recorded is read before what is wanted: an account linked in between is then
        # added again (the same state, nothing audited), where read the other way round the
        # sign-in's add was taken for one no longer wanted and removed.
        recorded = await anyio.to_thread.run_sync(self.store.subjects, t.name)
        wanted = await anyio.to_thread.run_sync(self.wanted_subjects, t)
        done = SubjectsSync()
        calls = 0
        for key, user in wanted.items():
            row = recorded.get(key)
            if row is not None and row.state == "added" and row.stream_id == stream_id:
                continue
            if calls >= MAX_SUBJECT_CALLS or (keep is not None and not await keep()):
                return done
            calls += 1
            code, why = await self._add_subject(t, add, stream_id, key, user, actor)
            if code is not None and 200 <= code < 300:
                done = replace(done, added=done.added + 1)
            else:
                done.failed.append(f"{key}: {why}")
            if code is None or code == 429:
                break  # unreachable, or asked to slow down: the rest wait for the next round
        for key, row in recorded.items():
            if key in wanted:
                continue
            if row.state != "add_failed" and row.stream_id == stream_id:
                if calls >= MAX_SUBJECT_CALLS or (keep is not None and not await keep()):
                    return done
                calls += 1
            removed, why = await self._remove_subject(t, remove, stream_id, row, actor)
            if removed:
                done = replace(done, removed=done.removed + 1)
            elif why:
                done.failed.append(f"{key}: {why}")
        return done

    async def _add_subject(
        self, t: Transmitter, url: str, stream_id: str, key: str, user: str, actor: str
    ) -> tuple[int | None, str]:
        """Ask the transmitter to add ``key`` and record what it answered: (the HTTP status or
        None, what was recorded)."""
        code, why = await self._subject_call(t, url, stream_id, key, verified=True)
        if code is not None and 200 <= code < 300:
            state, detail = "added", f"add answered HTTP {code}"
        else:
            state, detail = "add_failed", why
        await anyio.to_thread.run_sync(
            partial(
                self.store.note_subject, t.name, key, username=user, stream_id=stream_id,
                state=state, detail=detail, actor=actor,
            )
        )  # fmt: skip
        return code, detail

    async def _remove_subject(
        self, t: Transmitter, url: str | None, stream_id: str, row: StreamSubject, actor: str
    ) -> tuple[bool, str]:
        """Take ``row``'s subject off the stream, asking the transmitter only when bastion
        recorded it there, and record what came of it: (removed, why not, if it was not)."""
        key = row.subject_key
        if row.state == "add_failed" or row.stream_id != stream_id:
            # Never on this stream: nothing to ask the transmitter.
            await anyio.to_thread.run_sync(
                partial(
                    self.store.forget_subject, t.name, key, actor=actor,
                    detail="no longer a subject; it was not on the stream",
                )
            )  # fmt: skip
            return False, ""
        if url is None:
            code, why = None, "the transmitter has no remove_subject_endpoint"
        else:
            code, why = await self._subject_call(t, url, stream_id, key)
        if code is not None and (200 <= code < 300 or code == 404):
            await anyio.to_thread.run_sync(
                partial(
                    self.store.forget_subject, t.name, key, actor=actor,
                    detail=f"remove answered HTTP {code}",
                )
            )  # fmt: skip
            return True, ""
        await anyio.to_thread.run_sync(
            partial(
                self.store.note_subject, t.name, key, username=row.username,
                stream_id=stream_id, state="remove_failed", detail=why, actor=actor,
            )
        )  # fmt: skip
        return False, why

    # -- one subject at the moment its account is linked or unlinked ---------------------------

    def account_signed_in(self, provider: str, subject: str, username: str) -> None:
        """On the event loop, once a sign-in through login provider ``provider`` as its account
        ``subject`` committed: add the account to the stream of each transmitter whose
        ``linked_accounts`` names the provider, in a task of its own (`change_subject`), so
        that the sign-in neither waits for the transmitter nor fails with it. The rounds stay
        the backstop: a change not made now (too many at once, the transmitter down) is made
        by the next one."""
        for t in self.settings.transmitters:
            if t.linked_accounts != provider:
                continue
            crowded = self._outage(t, "sign-ins")
            if len(self._changes) >= MAX_PENDING_CHANGES:
                crowded.failed(
                    "ssf transmitter %s: %d subject changes pending; sign-ins' changes are left"
                    " to the next round", t.name, len(self._changes),
                )  # fmt: skip
                return
            crowded.ended("ssf transmitter %s: sign-ins' subject changes are made again", t.name)
            task = asyncio.create_task(
                self.change_subject(t, f"iss_sub:{t.linked_issuer}|{subject}"),
                name=f"ssf {t.name} subject",
            )
            self._changes.add(task)
            task.add_done_callback(self._changes.discard)

    async def change_subject(self, t: Transmitter, key: str, actor: str = SERVER) -> str:
        """Add ``key`` (an account of ``t``'s ``linked_accounts`` provider) to ``t``'s stream
        if it is wanted and not recorded there, or remove it if it is recorded and no longer
        wanted, as a round would for this one subject; what was done, in bastion's words. Any
        failure is recorded (or logged: once while they fail the same way) and left to the
        next round, never raised."""
        outage = self._outage(t, "subject change")
        try:
            said = await self._change_subject(t, key, actor)
        except Exception as e:  # noqa: BLE001 - the round is the backstop
            outage.failed(
                "ssf transmitter %s: subject changes are left to the next round: %s",
                t.name, e, kind=kind_of(e),
            )  # fmt: skip
            return f"not changed at {t.name} now ({e}); the next round tries again"[:500]
        outage.ended("ssf transmitter %s: subject changes are made again", t.name)
        return said

    async def _change_subject(self, t: Transmitter, key: str, actor: str) -> str:
        """`change_subject`'s work, its failures raised."""
        stream_id, add, remove, note = await self._subject_endpoints(t)
        if add is None:
            return note
        row = await anyio.to_thread.run_sync(self.store.subject, t.name, key)
        user = t.users.get(key)
        if user is None and t.linked_accounts:
            linked = await anyio.to_thread.run_sync(
                self.store.linked_users, t.linked_accounts, t.linked_issuer, (key,)
            )
            user = linked.get(key)
        if user is not None:
            if row is not None and row.state == "added" and row.stream_id == stream_id:
                return "already on the stream"
            code, detail = await self._add_subject(t, add, stream_id, key, user, actor)
            return ("added to" if code is not None and 200 <= code < 300
                    else "not added to") + f" the stream of {t.name} ({detail})"  # fmt: skip
        if row is None:
            return f"not on the stream of {t.name} (bastion recorded no add)"
        removed, why = await self._remove_subject(t, remove, stream_id, row, actor)
        if removed or not why:
            return f"removed from the stream of {t.name}"
        return f"not removed from the stream of {t.name} ({why}); the next round tries again"

    async def _subject_call(
        self, t: Transmitter, url: str, stream_id: str, key: str, *, verified: bool = False
    ) -> tuple[int | None, str]:
        """POST one subject to the add or remove endpoint: (the HTTP status or None, what to
        record if it failed, in bastion's words)."""
        action = "add" if verified else "remove"
        body: dict[str, Any] = {"stream_id": stream_id, "subject": identifier_of(key)}
        if verified:
            # SSF 1.0 §8.1.3.2: the subject is the operator's (the users table) or an account
            # the provider itself signed in: verified by bastion.
            body["verified"] = True
        try:
            code, _ = await self._call(t, "POST", url, json_body=body)
        except ValueError as e:
            return None, f"{action} failed: {e}"[:300]
        return code, f"{action} answered HTTP {code}"

    async def _sync_forever(self, t: Transmitter) -> None:
        """`sync_subjects` every ``subjects_sync_seconds``, its outcome in the stream's status
        detail; a failed round is noted and the next one tries again. One process runs the
        rounds (`_hold_round`): another that finds them held skips its turn. A failed round
        is logged once for as long as it fails the same way, and once that a round works."""
        outage = Outage(log)
        while True:
            try:
                if not await self._hold_round(t):
                    self.rounds[t.name] = self.rounds.get(t.name, 0) + 1
                    await asyncio.sleep(t.subjects_sync_seconds)
                    continue
                done = await self.sync_subjects(t, keep=partial(self._hold_round, t))
                recorded = await anyio.to_thread.run_sync(self.store.subjects, t.name)
                await self._note_subjects(t, done.summary(recorded))
            except Exception as e:  # noqa: BLE001 - any failure is reported and retried
                message = f"not brought in step: {e}"[:500]
                outage.failed(
                    "ssf transmitter %s: %s", t.name, message, kind=kind_of(e), level=logging.ERROR
                )
                await self._note_subjects(t, message)
            else:
                outage.ended("ssf transmitter %s: subjects are brought in step again", t.name)
            self.rounds[t.name] = self.rounds.get(t.name, 0) + 1
            await asyncio.sleep(t.subjects_sync_seconds)

    async def _hold_round(self, t: Transmitter) -> bool:
        """Hold (or keep holding) the rounds of ``t``'s subjects for this process, until a
        round's wait and two requests' time from now: renewed at each round and before each
        request, so they stay this process's while it lives and pass to another within that
        time once it ended. False when another process holds them, or the database could not
        say (a round skipped is made by the next)."""
        now = time.time()
        until = now + t.subjects_sync_seconds + 2 * ANSWER_SECONDS
        outage = self._outage(t, "rounds")
        try:
            held = await anyio.to_thread.run_sync(
                self.store.take_round, t.name, self.owner, now, until
            )
        except Exception as e:  # noqa: BLE001 - the next round asks again
            round_failed(
                outage, e, f"ssf transmitter {t.name}: the rounds of its subjects not held"
            )
            return False
        outage.ended("ssf transmitter %s: the rounds of its subjects are held again", t.name)
        return held

    async def _note_subjects(self, t: Transmitter, summary: str) -> None:
        """Record the subjects' summary beside the stream's status (which it leaves as it is),
        when it is not what this process recorded last."""
        if self.store.seen.get(t.name, {}).get("subjects") == summary:
            return
        outage = self._outage(t, "subjects")
        try:
            await anyio.to_thread.run_sync(self.store.note_subjects, t.name, summary)
        except Exception as e:  # noqa: BLE001 - noted again next round
            round_failed(outage, e, f"ssf transmitter {t.name}: its subjects could not be recorded")
        else:
            outage.ended("ssf transmitter %s: its subjects are recorded again", t.name)

    async def _poll_forever(self, t: Transmitter, stream: dict[str, Any]) -> None:
        """Poll every ``poll_interval_seconds`` (at once while more is available). A failure
        is logged and noted in the stream's status once for as long as it stays the same, and
        once that a poll is answered again."""
        url = poll_url(stream)  # `configure` used the stream only if this holds
        ack: list[str] = []
        errs: dict[str, dict[str, str]] = {}
        outage = Outage(log)
        while True:
            try:
                more, ack, errs = await self.poll_once(t, url, ack, errs)
            except Exception as e:  # noqa: BLE001 - reported, retried; acks are sent again
                if isinstance(e, PollCut):
                    # The poll was answered (what it acknowledged is done with): what it stored
                    # is acknowledged next, not delivered again and refused as a replay.
                    ack, errs = e.ack, e.errs
                    e = e.__cause__ or e
                message = f"poll failed: {e}"[:500]
                said = outage.failed(
                    "ssf transmitter %s: %s", t.name, message, kind=kind_of(e), level=logging.ERROR
                )
                if said:
                    await self._note(t, "error", message)
                await asyncio.sleep(t.poll_interval_seconds)
                continue
            if outage.ended("ssf transmitter %s: poll answered again", t.name):
                await self._note(t, "polling", "poll answered again")
            if not more and not ack and not errs:
                await asyncio.sleep(t.poll_interval_seconds)

    async def poll_once(
        self, t: Transmitter, url: str, ack: list[str], errs: dict[str, dict[str, str]]
    ) -> tuple[bool, list[str], dict[str, dict[str, str]]]:
        """One RFC 8936 §2.2 request: acknowledge ``ack``, report ``errs``, take new SETs.
        Returns (more available: said by an answer that held SETs, jtis to acknowledge next,
        errors to report next); `PollCut` when one of its SETs could not be stored."""
        body: dict[str, Any] = {"maxEvents": t.max_events, "returnImmediately": True}
        if ack:
            body["ack"] = ack
        if errs:
            body["setErrs"] = errs
        code, content = await self._call(t, "POST", url, json_body=body)
        if code != 200:
            raise ValueError(f"{url} answered HTTP {code}")
        answer = untrusted_json.loads(content)  # JsonRefused: a ValueError, as the others
        sets = answer.get("sets") if isinstance(answer, dict) else None
        if not isinstance(sets, dict):
            raise ValueError(f"{url} answered no sets object")
        next_ack: list[str] = []
        next_errs: dict[str, dict[str, str]] = {}
        for jti, token in list(sets.items())[: t.max_events]:
            if not isinstance(token, str):
                next_errs[str(jti)] = {"err": "invalid_request", "description": "not a SET"}
                continue
            try:
                outcome = await self.accept(t, token)
            except SetRefused as e:
                next_errs[str(jti)] = e.as_dict()
                continue
            except Replayed:
                next_ack.append(str(jti))
                continue
            except Exception as e:
                # Not stored (the database away, say): this SET and the rest wait at the
                # transmitter; those taken before it are acknowledged with the next poll.
                raise PollCut(next_ack, next_errs) from e
            if outcome.jti != jti:
                log.warning(
                    "ssf transmitter %s: SET keyed %s carries jti %s", t.name, jti, outcome.jti
                )
            next_ack.append(str(jti))
        # More is taken at its word only from an answer that held SETs: one saying it with none,
        # again and again (a broken or hostile transmitter), was polled with no pause for ever.
        more = bool(answer.get("moreAvailable")) and bool(sets)
        return more, next_ack, next_errs
