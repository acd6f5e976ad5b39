"""What the Shared Signals receiver keeps in the database: the ``jti`` of every SET received
(RFC 8417 §2.2 ``jti``, for replay refusal, kept for a bounded time), each transmitter's stream
(SSF 1.0 §8: its id, status, and the verification ``state`` asked for), and when the event
behind each value written as a fact happened (so that an older event delivered late does not
replace it), and the subjects bastion added to each stream (SSF 1.0 §8.1.3) or failed to add or
remove, and which process runs the rounds of a stream's subjects. Each change of a stream is
an ``ssf.stream_changed`` audit event naming its actor, and each change of a subject's state an
``ssf.subject_*`` one, written in the changing transaction."""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

from bastion.audit.log import AuditLog
from bastion.constant_time import same
from bastion.db import Database
from bastion.untrusted_json import writable

_MIGRATIONS = [
    """
    CREATE TABLE ssf_received (
        issuer TEXT NOT NULL,
        jti TEXT NOT NULL,
        received_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (issuer, jti)
    );
    CREATE INDEX ssf_received_at ON ssf_received (received_at);
    CREATE TABLE ssf_streams (
        transmitter TEXT PRIMARY KEY,
        stream_id TEXT,
        status TEXT NOT NULL,
        verified_at DOUBLE PRECISION,
        verification_state TEXT,
        detail TEXT NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    );
    """,
    # One row per value an event wrote (a user's or device's compliance, a claim): the time of
    # the event behind it. Keyed by a digest: a claim's name may be as long as a fact's key.
    """
    CREATE TABLE ssf_value_times (
        value_key TEXT PRIMARY KEY,
        event_time DOUBLE PRECISION NOT NULL
    );
    """,
    # The subjects bastion asked a transmitter to send events about (SSF 1.0 §8.1.3): state
    # "added" (on the stream named), "add_failed" (not on it yet; tried again) or
    # "remove_failed" (still on it; tried again). A subject removed has no row.
    """
    CREATE TABLE ssf_subjects (
        transmitter TEXT NOT NULL,
        subject_key TEXT NOT NULL,
        username TEXT NOT NULL,
        stream_id TEXT NOT NULL,
        state TEXT NOT NULL,
        detail TEXT NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (transmitter, subject_key)
    );
    """,
    # What the last round of bringing the stream's subjects in step did (counts, never a
    # subject): shown beside the stream's status.
    "ALTER TABLE ssf_streams ADD COLUMN subjects TEXT;",
    # Which process runs the rounds of the stream's subjects, and until when (`take_round`):
    # one at a time, whatever the number of replicas.
    """
    ALTER TABLE ssf_streams ADD COLUMN round_owner TEXT;
    ALTER TABLE ssf_streams ADD COLUMN round_until DOUBLE PRECISION;
    """,
]
SUBJECT_STATES = ("added", "add_failed", "remove_failed")


@dataclass(frozen=True)
class StreamStatus:
    """One transmitter's stream as recorded (``bastion signals streams status`` shows it)."""

    transmitter: str
    stream_id: str | None
    status: str
    verified_at: float | None
    detail: str
    updated_at: float
    # The last round of subjects (`note_subjects`), None before the first.
    subjects: str | None = None


@dataclass(frozen=True)
class StreamSubject:
    """One subject of a transmitter's stream as recorded (``bastion signals subjects status``)."""

    transmitter: str
    subject_key: str
    username: str
    stream_id: str
    state: str
    detail: str
    updated_at: float


class SsfStore:
    """The jtis received (for replay refusal) and each transmitter's stream state."""

    def __init__(self, db: Database) -> None:
        self.db = db
        # Each stream's status, detail and last round of subjects, for /readyz: as this
        # process last recorded it, or read from the database since (`show_streams`).
        self.seen: dict[str, dict[str, str]] = {}
        # Moves as this process records a stream's state, before and after it is written: a
        # read of the database that overlapped a write does not replace what it shows.
        self._shown_writes = 0
        db.migrate("ssf", _MIGRATIONS)
        self.audit = AuditLog(db)

    def claim(self, issuer: str, jti: str, now: float) -> bool:
        """Record the jti; False if it was received before. Made in the transaction that applies
        the SET (`SsfReceiver.receive`), so that it is kept only with the SET's effects."""
        rows = self.db.execute(
            "INSERT INTO ssf_received (issuer, jti, received_at) VALUES (?, ?, ?)"
            " ON CONFLICT DO NOTHING RETURNING jti",
            (issuer, jti, now),
        )
        return bool(rows)

    def take_value(self, value: tuple, event_time: float) -> bool:
        """Record that the value of ``value`` (a fact's predicate, entity and any key before its
        last term) is now an event's of ``event_time``; False, recording nothing, when an event
        that happened later set it. Made in the transaction that applies the SET: a replica
        applying another event for the same value waits for it, then compares with its time."""
        key = hashlib.sha256(json.dumps([str(v) for v in value]).encode()).hexdigest()
        rows = self.db.execute(
            "INSERT INTO ssf_value_times (value_key, event_time) VALUES (?, ?)"
            " ON CONFLICT (value_key) DO UPDATE SET event_time = excluded.event_time"
            " WHERE ssf_value_times.event_time <= excluded.event_time RETURNING value_key",
            (key, event_time),
        )
        return bool(rows)

    def forget_before(self, cutoff: float) -> int:
        return len(
            self.db.execute(
                "DELETE FROM ssf_received WHERE received_at < ? RETURNING jti", (cutoff,)
            )
        )

    def save_stream(
        self,
        transmitter: str,
        status: str,
        detail: str,
        *,
        stream_id: str | None = None,
        verification_state: str | None = None,
        forget_verification: bool = False,
        actor: str,
    ) -> None:
        """Record ``transmitter``'s stream as ``actor`` (`bastion.audit.actor`; ``ssf:<name>``
        for the transmitter's own word) left it; a change of its status, id or verification
        request is audited in the same transaction. ``forget_verification``: the verification
        asked for before is no longer awaited (its event, should it come, verifies nothing)."""
        # Both may quote what the transmitter said (an error's text): held as text any database
        # and any answer can hold.
        status, detail = writable(status), writable(detail)
        now = time.time()
        with self._showing(transmitter, status=status, detail=detail), self.db.transaction():
            rows = self.db.execute(
                "SELECT stream_id, status, verification_state FROM ssf_streams"
                " WHERE transmitter = ?",
                (transmitter,),
            )
            before = rows[0] if rows else (None, None, None)
            after = (
                stream_id or before[0],
                status,
                None if forget_verification else verification_state or before[2],
            )
            if after != tuple(before):
                self._changed(
                    transmitter,
                    stream_id=after[0],
                    previous=before[1],
                    status=status,
                    detail=detail,
                    actor=actor,
                    verification_requested=after[2] not in (None, before[2]),
                )
            if rows:
                self.db.execute(
                    "UPDATE ssf_streams SET status = ?, detail = ?, updated_at = ?,"
                    " stream_id = COALESCE(?, stream_id), verification_state = ?"
                    " WHERE transmitter = ?",
                    (status, detail, now, stream_id, after[2], transmitter),
                )
            else:
                self.db.execute(
                    "INSERT INTO ssf_streams (transmitter, stream_id, status, verification_state,"
                    " detail, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (transmitter, stream_id, status, verification_state, detail, now),
                )

    def stream_updated(
        self,
        transmitter: str,
        stream_id: str,
        changed: list[str],
        *,
        not_delivered: str | None,
        actor: str,
    ) -> None:
        """bastion changed its stream at the transmitter (SSF 1.0 §8.1.1.3): an
        ``ssf.stream_changed`` event naming what changed (``changed``, bastion's words) and the
        event types the transmitter still does not deliver; the stream's recorded status is
        `save_stream`'s, left as it is."""
        rows = self.db.execute(
            "SELECT status FROM ssf_streams WHERE transmitter = ?", (transmitter,)
        )
        status = rows[0][0] if rows else None
        self._changed(
            transmitter, stream_id=stream_id, previous=status, status=status,
            detail="updated at the transmitter (SSF 1.0 §8.1.1.3)", actor=actor,
            verification_requested=False, changed=changed,
            **({"not_delivered": not_delivered} if not_delivered else {}),
        )  # fmt: skip

    def _changed(self, transmitter: str, **detail) -> None:
        """Under the changing transaction: the audit event of a stream's change. Never the
        verification state asked for (the transmitter proves itself by sending it back)."""
        self.audit.record("ssf.stream_changed", transmitter=transmitter, **detail)

    def verified(self, transmitter: str, state: str | None, *, actor: str) -> bool:
        """The stream's verification event arrived: True if its state is the one asked for.
        Called in the transaction that applies the event, so its audit event is kept with it."""
        rows = self.db.execute(
            "SELECT verification_state, stream_id, status FROM ssf_streams WHERE transmitter = ?",
            (transmitter,),
        )
        if not rows or rows[0][0] is None or state is None:
            return False
        if not same(str(rows[0][0]), str(state)):
            return False
        if rows[0][2] != "verified":
            self._changed(
                transmitter,
                stream_id=rows[0][1],
                previous=rows[0][2],
                status="verified",
                detail="verification event received",
                actor=actor,
                verification_requested=False,
            )
        with self._showing(transmitter, status="verified", detail="verification event received"):
            self.db.execute(
                "UPDATE ssf_streams SET verified_at = ?, status = 'verified',"
                " detail = 'verification event received', updated_at = ? WHERE transmitter = ?",
                (time.time(), time.time(), transmitter),
            )
        return True

    def note_subjects(self, transmitter: str, summary: str) -> None:
        """What the last round of the stream's subjects did (`SubjectsSync.summary`); the
        subjects' own changes are audited one by one (`note_subject`)."""
        summary = writable(summary)
        with self._showing(transmitter, subjects=summary):
            self.db.execute(
                "UPDATE ssf_streams SET subjects = ? WHERE transmitter = ?", (summary, transmitter)
            )

    @contextlib.contextmanager
    def _showing(self, transmitter: str, **shown: str) -> Iterator[None]:
        """Show ``shown`` of ``transmitter``'s stream (`seen`) at once, while it is written."""
        self._shown_writes += 1
        self.seen.setdefault(transmitter, {}).update(shown)
        try:
            yield
        finally:
            self._shown_writes += 1

    def show_streams(self, names: frozenset[str]) -> None:
        """Show the streams of the transmitters ``names`` (`seen`) as the database has them:
        another process (a replica, `streams configure`) may have changed them since this one
        last wrote. Left as they are if this process wrote one meanwhile (its own is newer)."""
        writes = self._shown_writes
        read = self.streams()
        if self._shown_writes != writes:
            return
        for row in read:
            if row.transmitter in names:
                shown = {"status": row.status, "detail": row.detail}
                if row.subjects is not None:
                    shown["subjects"] = row.subjects
                self.seen[row.transmitter] = shown

    def take_round(self, transmitter: str, owner: str, now: float, until: float) -> bool:
        """Hold the rounds of ``transmitter``'s subjects for process ``owner`` until ``until``:
        True when it held them already or nobody holds them now (the holder's time ran out),
        False when another process does. The connections' outbox leases its rows the same way:
        one conditional UPDATE, so of two processes asking at once one gets it, and a process
        that ended lets go by no longer renewing. False too before the stream is recorded."""
        rows = self.db.execute(
            "UPDATE ssf_streams SET round_owner = ?, round_until = ? WHERE transmitter = ?"
            " AND (round_owner IS NULL OR round_owner = ? OR round_until <= ?)"
            " RETURNING transmitter",
            (owner, until, transmitter, owner, now),
        )
        return bool(rows)

    def stream(self, transmitter: str) -> StreamStatus | None:
        rows = self.db.execute(
            "SELECT transmitter, stream_id, status, verified_at, detail, updated_at, subjects"
            " FROM ssf_streams WHERE transmitter = ?",
            (transmitter,),
        )
        return StreamStatus(*rows[0]) if rows else None

    # -- subjects (SSF 1.0 §8.1.3) -------------------------------------------------------------

    def subjects(self, transmitter: str) -> dict[str, StreamSubject]:
        rows = self.db.execute(
            "SELECT transmitter, subject_key, username, stream_id, state, detail, updated_at"
            " FROM ssf_subjects WHERE transmitter = ? ORDER BY subject_key",
            (transmitter,),
        )
        return {r[1]: StreamSubject(*r) for r in rows}

    def subject(self, transmitter: str, key: str) -> StreamSubject | None:
        rows = self.db.execute(
            "SELECT transmitter, subject_key, username, stream_id, state, detail, updated_at"
            " FROM ssf_subjects WHERE transmitter = ? AND subject_key = ?",
            (transmitter, key),
        )
        return StreamSubject(*rows[0]) if rows else None

    def note_subject(
        self,
        transmitter: str,
        key: str,
        *,
        username: str,
        stream_id: str,
        state: str,
        detail: str,
        actor: str,
    ) -> None:
        """Record what the transmitter did with ``key``; a change of its state (or of the
        stream it is on) is audited in the same transaction as ``ssf.subject_added`` or
        ``ssf.subject_failed``. ``detail`` is bastion's words (an HTTP status), never the
        transmitter's."""
        assert state in SUBJECT_STATES, state
        detail = writable(detail)
        with self.db.transaction():
            # Two writers of one subject (a sign-in's add and a round, two processes) take
            # turns, so that the second reads the first's state and audits no change twice.
            self.db.lock(f"ssf_subject:{transmitter}:{key}")
            before = self.db.execute(
                "SELECT state, stream_id FROM ssf_subjects WHERE transmitter = ? AND"
                " subject_key = ?",
                (transmitter, key),
            )
            if not before or tuple(before[0]) != (state, stream_id):
                self.audit.record(
                    "ssf.subject_added" if state == "added" else "ssf.subject_failed",
                    subject=username, transmitter=transmitter, subject_key=key,
                    stream_id=stream_id, state=state, detail=detail, actor=actor,
                )  # fmt: skip
            self.db.execute(
                "INSERT INTO ssf_subjects (transmitter, subject_key, username, stream_id, state,"
                " detail, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (transmitter, subject_key) DO UPDATE SET"
                " username = excluded.username, stream_id = excluded.stream_id,"
                " state = excluded.state, detail = excluded.detail,"
                " updated_at = excluded.updated_at",
                (transmitter, key, username, stream_id, state, detail, time.time()),
            )

    def forget_subject(self, transmitter: str, key: str, *, detail: str, actor: str) -> None:
        """The subject is off the stream (removed, or never added): its row goes, audited as
        ``ssf.subject_removed`` when it was on the stream or meant to leave it."""
        with self.db.transaction():
            self.db.lock(f"ssf_subject:{transmitter}:{key}")
            rows = self.db.execute(
                "DELETE FROM ssf_subjects WHERE transmitter = ? AND subject_key = ?"
                " RETURNING username, stream_id, state",
                (transmitter, key),
            )
            if rows and rows[0][2] != "add_failed":
                self.audit.record(
                    "ssf.subject_removed", subject=rows[0][0], transmitter=transmitter,
                    subject_key=key, stream_id=rows[0][1], detail=writable(detail), actor=actor,
                )  # fmt: skip

    def linked_accounts(self, provider: str, issuer: str) -> dict[str, str]:
        """The accounts of login provider ``provider`` (issuer ``issuer``) linked to users, as
        ``iss_sub`` lookup keys: {key: user}."""
        rows = self.db.execute(
            "SELECT subject, username FROM identity_accounts WHERE provider = ?", (provider,)
        )
        return {f"iss_sub:{issuer}|{sub}": user for sub, user in rows}

    def linked_users(self, provider: str, issuer: str, keys: tuple[str, ...]) -> dict[str, str]:
        """Of ``keys``, those naming an account of ``provider`` linked to a user: {key: user}."""
        prefix = f"iss_sub:{issuer}|"
        found: dict[str, str] = {}
        for key in keys:
            if key.startswith(prefix):
                rows = self.db.execute(
                    "SELECT username FROM identity_accounts WHERE provider = ? AND subject = ?",
                    (provider, key[len(prefix) :]),
                )
                if rows:
                    found[key] = rows[0][0]
        return found

    def streams(self) -> list[StreamStatus]:
        rows = self.db.execute(
            "SELECT transmitter, stream_id, status, verified_at, detail, updated_at, subjects"
            " FROM ssf_streams ORDER BY transmitter"
        )
        return [StreamStatus(*r) for r in rows]
