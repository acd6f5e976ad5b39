"""Approval requests and their answers, kept in bastion's database (SQLite or PostgreSQL).

A request is one held call (kind ``approval``: waits for a person before it runs) or one held
result (kind ``review``: the upstream answered; a person releases the answer or withholds it). It
is bound to the exact call by ``binding`` (a keyed digest of the user, agent, chain of agents,
task, server, method, target and arguments), carries the policy version it was held under and an expiry, and moves
``pending`` -> ``approved`` | ``denied`` | ``expired``, then ``approved`` -> ``used`` once the call
it unlocked runs (single use; ``running_until`` while that run may still be upstream, renewed
while it is in flight; back to ``approved`` if that run never reached the upstream). A review
moves ``pending`` -> ``released`` | ``withheld`` | ``expired``, and ``released`` ->
``delivered``. The arguments and a held result are encrypted at rest (AES-GCM, `cryptography`)
under a key of the deployment; a held result is deleted when it is delivered, withheld or
expires.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography.hazmat.primitives.ciphers import (
    AEADDecryptionContext,
    AEADEncryptionContext,
    Cipher,
    algorithms,
    modes,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bastion.db import Database, prune_rows
from bastion.ids import typed_id
from bastion.large_json import OFF_LOOP_BYTES, LargeMessage, read, written
from bastion.signals.suspensions import has_person, token_principals
from bastion.turns import PIECE, Turns

# The length of an AES-GCM tag, written after the ciphertext.
_TAG = 16

_MIGRATIONS = [
    """
    CREATE TABLE approval_requests (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        status TEXT NOT NULL,
        binding TEXT NOT NULL,
        subject TEXT NOT NULL,
        client_id TEXT NOT NULL,
        server TEXT NOT NULL,
        method TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        arguments_digest TEXT NOT NULL,
        arguments BYTEA,
        policy_version INTEGER NOT NULL,
        decision_id TEXT NOT NULL,
        rules TEXT NOT NULL,
        approvers TEXT NOT NULL,
        required INTEGER NOT NULL,
        self_forbidden INTEGER NOT NULL,
        window_minutes INTEGER NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        resolved_at DOUBLE PRECISION,
        used_at DOUBLE PRECISION,
        used_by TEXT,
        result BYTEA,
        withheld_fields TEXT NOT NULL
    );
    CREATE INDEX approval_requests_binding ON approval_requests (binding, created_at);
    CREATE INDEX approval_requests_status ON approval_requests (status, expires_at);
    CREATE TABLE approval_answers (
        request_id TEXT NOT NULL,
        approver TEXT NOT NULL,
        answer TEXT NOT NULL,
        minutes INTEGER NOT NULL,
        channel TEXT NOT NULL,
        reason TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (request_id, approver)
    );
    """,
    # A delegated call's agents, first to calling, as a JSON list ('[]' for a direct grant): the
    # people asked see whom the calling agent works for.
    "ALTER TABLE approval_requests ADD COLUMN agents TEXT NOT NULL DEFAULT '[]'",
    # The person who confirms the call when no approver rule names anyone (`confirmer`): the
    # user, or the owner of an agent acting as itself; '' when there is none. NULL in a row
    # made before it was kept: read as the user if a person stands behind the call, else none.
    "ALTER TABLE approval_requests ADD COLUMN confirmer TEXT",
    # Until when the run an approval was spent on may still be upstream (NULL: it has ended, or
    # was never marked): an identical call meanwhile is told the run is in progress, not held
    # for a new approval. Bounded, so that a replica that died mid-run blocks nothing for long.
    "ALTER TABLE approval_requests ADD COLUMN running_until DOUBLE PRECISION",
    # The fields each reviewer withheld, as a JSON list: a result released by several reviewers
    # goes out with every field any of them withheld ('[]' in a row made before: not kept then).
    "ALTER TABLE approval_answers ADD COLUMN withheld_fields TEXT NOT NULL DEFAULT '[]'",
    # The approvals one user's agent has waiting, counted at each new one (`max_pending`).
    "CREATE INDEX approval_requests_agent ON approval_requests (subject, client_id, status)",
    # The task the call's token was for (a task grant, docs/delegation.md); '' for none, as in
    # a row made before it was kept, whose binding named no task: such a request is for the
    # call made under no task.
    "ALTER TABLE approval_requests ADD COLUMN task TEXT NOT NULL DEFAULT ''",
]

KINDS = ("approval", "review")
# pending: waiting for people; approved / released: answered yes (an approval may then be used
# once); denied / withheld: answered no; expired: nobody answered in time; used / delivered: the
# call it unlocked ran, or its result went to the agent.
OPEN = "pending"
STATUSES = (
    OPEN,
    "approved",
    "denied",
    "expired",
    "used",
    "released",
    "withheld",
    "delivered",
    "void",
)
ANSWERS = ("approve", "deny")
# The most requests one listing returns, through the API or the command line (with an approver,
# the store reads up to 20 times as many rows to find them).
MAX_LIST = 200
CHANNELS = ("page", "api", "cli", "elicitation")

_COLUMNS = (
    "id, kind, status, binding, subject, client_id, server, method, action, target,"
    " arguments_digest, arguments, policy_version, decision_id, rules, approvers, required,"
    " self_forbidden, window_minutes, created_at, expires_at, resolved_at, used_at, used_by,"
    " result, withheld_fields, agents, confirmer, running_until, task"
)


@dataclass(frozen=True, slots=True)
class Answer:
    """One person's answer to a request."""

    approver: str
    answer: str  # approve | deny
    minutes: int  # approve for this many minutes (a time-bounded grant); 0: this call only
    channel: str
    reason: str
    at: float
    withheld_fields: tuple[str, ...] = ()  # a reviewer's release: these paths masked


@dataclass(frozen=True, slots=True)
class ApprovalRequest:
    id: str
    kind: str
    status: str
    binding: str
    subject: str  # the user the agent acts for
    client_id: str  # the agent
    server: str
    method: str
    action: str
    target: str  # the resource, as the policy names it: Tool{"desk/delete_customer"}
    arguments_digest: str
    arguments: Any  # decrypted; None when the call had none
    policy_version: int
    decision_id: str  # the decision that held it
    rules: tuple[str, ...]  # why: the rules that required it
    approvers: tuple[str, ...]  # who may answer, as the policy said when it was held
    required: int  # distinct approvals needed
    self_forbidden: bool
    window_minutes: int  # the longest time-bounded grant an approver may give (0: none)
    created_at: float
    expires_at: float
    resolved_at: float | None = None
    used_at: float | None = None
    used_by: str | None = None  # the decision id of the call it unlocked
    withheld_fields: tuple[str, ...] = ()  # a review released with these paths masked
    # A delegated call's agents, first to calling (the last is ``client_id``); () when direct.
    agents: tuple[str, ...] = ()
    # Who confirms the call when no approver rule names anyone: the user, if a person stands
    # behind it; for an agent acting as itself, its owner, if one is a bastion user; else None
    # (`bastion.approvals.service.Approvals.confirmer`). Never a name of the call's agents.
    confirmer: str | None = None
    # Of a used approval: until when the run it unlocked may still be upstream (None: ended).
    running_until: float | None = None
    answers: tuple[Answer, ...] = field(default=())
    # The task the call's token was for (docs/delegation.md); "" for none.
    task: str = ""

    @property
    def approvals(self) -> tuple[Answer, ...]:
        return tuple(a for a in self.answers if a.answer == "approve")

    @property
    def chain(self) -> tuple[str, ...]:
        """The agents of the call, first to calling (``client_id`` alone for a direct grant)."""
        return self.agents or (self.client_id,)

    @property
    def person(self) -> bool:
        """Whether a person stands behind the call: its user is not one of its agents (a client
        credentials token's subject is its own client id)."""
        return has_person(token_principals(self.subject, self.chain))

    def running(self, now: float) -> bool:
        """Whether the run this approval unlocked may still be upstream at ``now``: it was
        spent on a call whose end is not written yet, within the bound it was spent with."""
        return self.status == "used" and self.running_until is not None and now < self.running_until

    def names(self, person: str) -> bool:
        """Whether the request, as held, names ``person`` to answer it: among its approvers, or,
        where none is named, its confirmer. Who may answer now is `Approvals.may_answer`'s."""
        return person in self.approvers or (not self.approvers and person == self.confirmer)

    def summary(self) -> dict[str, Any]:
        """The request as the API and the CLI show it (the arguments in full; never a result)."""
        return {
            "id": self.id,
            "kind": self.kind,
            "status": self.status,
            "user": self.subject,
            "person": self.person,
            "confirmer": self.confirmer,
            "agent": self.client_id,
            "agents": list(self.agents),
            "task": self.task,
            "server": self.server,
            "method": self.method,
            "action": self.action,
            "target": self.target,
            "arguments": self.arguments,
            "arguments_digest": self.arguments_digest,
            "policy_version": self.policy_version,
            "decision_id": self.decision_id,
            "rules": list(self.rules),
            "approvers": list(self.approvers),
            "required": self.required,
            "self_approval_forbidden": self.self_forbidden,
            "window_minutes": self.window_minutes,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "resolved_at": self.resolved_at,
            "used_at": self.used_at,
            "used_by": self.used_by,
            "withheld_fields": list(self.withheld_fields),
            "answers": [
                {
                    "approver": a.approver,
                    "answer": a.answer,
                    "minutes": a.minutes,
                    "channel": a.channel,
                    "reason": a.reason,
                    "at": a.at,
                    "withheld_fields": list(a.withheld_fields),
                }
                for a in self.answers
            ],
        }


def prune_requests(db: Database, before: float) -> dict[str, int]:
    """Delete the requests, with their answers, that expired, were answered and were used
    before ``before`` (the audit retention, `bastion.audit.retention`): their record is kept
    as long as the audit trail's. Every answer comes before its request's expiry."""
    return prune_rows(
        db,
        "approvals",
        "approval_requests",
        "id",
        "expires_at < ? AND COALESCE(resolved_at, 0) < ? AND COALESCE(used_at, 0) < ?",
        (before, before, before),
        children=[("approval_answers", "request_id")],
    )


def new_request_id() -> str:
    """144 random bits, URL-safe, never starting with "-" (`typed_id`)."""
    return typed_id(18)


def keeps_requests(db: Database) -> bool:
    """Whether ``db`` keeps approval requests (a server with a gateway made their tables),
    brought up to this version's schema if it does, as `ApprovalStore` brings it."""
    rows = db.execute(
        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations WHERE component = 'approvals'"
    )
    if not rows[0][0]:
        return False
    db.migrate("approvals", _MIGRATIONS)
    return True


def resolve_request(
    db: Database,
    request_id: str,
    status: str,
    *,
    from_status: str,
    at: float,
    withheld_fields: tuple[str, ...] = (),
) -> bool:
    """`ApprovalStore.resolve` on ``db``, at ``at``: for a writer that holds no sealing key
    (a suspension closing the requests it covers, `bastion.approvals.suspension`)."""
    keep_result = status == "released"
    rows = db.execute(
        "UPDATE approval_requests SET status = ?, resolved_at = ?, withheld_fields = ?"
        + ("" if keep_result else ", result = NULL")
        + " WHERE id = ? AND status = ? RETURNING id",
        (status, at, json.dumps(list(withheld_fields)), request_id, from_status),
    )
    return bool(rows)


class Sealed:
    """AES-GCM under a key of the deployment, for what a request holds that is data (arguments,
    a held result): a reader of the database alone does not see it. The request id is the
    associated data, so a sealed value cannot be moved to another request.

    A large held result (a `LargeMessage`; sealed text of `OFF_LOOP_BYTES` or more, opened) is
    encoded, encrypted, decrypted and decoded in turns (`bastion.large_json`), not in one C
    call each that would keep the GIL, and so the event loop, for as long as it runs: what is
    sealed is the same either way (GCM is a stream cipher, its tag written last), and what is
    opened is the same value."""

    def __init__(self, key: bytes) -> None:
        self._key = key[:32]
        self._aead = AESGCM(self._key)

    def seal(self, request_id: str, value: Any) -> bytes:
        nonce = secrets.token_bytes(12)
        if value.__class__ is LargeMessage:
            return nonce + self._in_turns(self._gcm(nonce).encryptor(), request_id, written(value))
        data = json.dumps(value, separators=(",", ":")).encode()
        return nonce + self._aead.encrypt(nonce, data, request_id.encode())

    def open(self, request_id: str, blob: bytes | memoryview | None) -> Any:
        if blob is None:
            return None
        blob = bytes(blob)
        if len(blob) < OFF_LOOP_BYTES:
            return json.loads(self._aead.decrypt(blob[:12], blob[12:], request_id.encode()))
        # A tag that does not match raises `InvalidTag` at the end, as the one-shot does.
        decryptor = self._gcm(blob[:12], blob[-_TAG:]).decryptor()
        return read(self._in_turns(decryptor, request_id, memoryview(blob)[12:-_TAG]))

    def _gcm(self, nonce: bytes, tag: bytes | None = None) -> Cipher:
        return Cipher(algorithms.AES(self._key), modes.GCM(nonce, tag))

    @staticmethod
    def _in_turns(
        context: AEADEncryptionContext | AEADDecryptionContext,
        request_id: str,
        data: bytes | memoryview,
    ) -> bytes:
        """``data`` through ``context`` a `PIECE` at a time, a tick after each; with the tag
        after it when encrypting (`AESGCM.encrypt`'s layout)."""
        turns = Turns()
        context.authenticate_additional_data(request_id.encode())
        pieces = []
        for start in range(0, len(data), PIECE):
            pieces.append(context.update(data[start : start + PIECE]))
            turns.tick()
        pieces.append(context.finalize())
        if isinstance(context, AEADEncryptionContext):
            pieces.append(context.tag)
        return b"".join(pieces)


class TooManyPending(Exception):
    """A new request would be past the most its agent may have waiting (`create`)."""

    def __init__(self, waiting: int) -> None:
        super().__init__(f"{waiting} requests wait already")
        self.waiting = waiting


def _like_literal(text: str) -> str:
    """``text`` matched as it is by LIKE with ``ESCAPE '\\'``: its ``%``, ``_`` and ``\\``
    escaped."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class ApprovalStore:
    """Reads and writes requests. Every method does I/O: call it off the event loop."""

    def __init__(self, db: Database, key: bytes, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock
        self.sealed = Sealed(key)
        db.migrate("approvals", _MIGRATIONS)

    def create(
        self,
        *,
        kind: str,
        binding: str,
        subject: str,
        client_id: str,
        server: str,
        method: str,
        action: str,
        target: str,
        arguments_digest: str,
        arguments: Any,
        policy_version: int,
        decision_id: str,
        rules: tuple[str, ...],
        approvers: tuple[str, ...],
        required: int,
        self_forbidden: bool,
        window_minutes: int,
        seconds: float,
        result: Any = None,
        agents: tuple[str, ...] = (),
        confirmer: str | None = None,
        max_pending: int | None = None,
        task: str = "",
    ) -> tuple[ApprovalRequest, bool]:
        """The pending request of this kind bound to ``binding``, made if there is none; and
        whether it was made now. Identical pending calls share one request; a review holds the
        result of one run (the decision ``decision_id``), and is shared by no other run: what a
        reviewer releases goes with the run it came from. `TooManyPending` if a new one would
        be past ``max_pending`` of its kind waiting for ``subject``'s agent ``client_id``."""
        now = self.clock()
        with self.db.transaction():
            self.db.lock(f"approval:{binding}")
            found = self._pending(kind, binding, now, decision_id if kind == "review" else None)
            if found is not None:
                return found, False
            if max_pending is not None:
                # Counted under a lock of the agent's, so that two processes holding two of its
                # calls at once count each other's.
                self.db.lock(json.dumps(["approvals pending", subject, client_id]))
                waiting = self.db.execute(
                    "SELECT COUNT(*) FROM approval_requests WHERE subject = ? AND client_id = ?"
                    " AND status = ? AND kind = ? AND expires_at > ?",
                    (subject, client_id, OPEN, kind, now),
                )[0][0]
                if waiting >= max_pending:
                    raise TooManyPending(waiting)
            request_id = new_request_id()
            self.db.execute(
                f"INSERT INTO approval_requests ({_COLUMNS}) VALUES"
                " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL,"
                " NULL, ?, ?, ?, ?, NULL, ?)",
                (
                    request_id,
                    kind,
                    OPEN,
                    binding,
                    subject,
                    client_id,
                    server,
                    method,
                    action,
                    target,
                    arguments_digest,
                    None if arguments is None else self.sealed.seal(request_id, arguments),
                    policy_version,
                    decision_id,
                    json.dumps(list(rules)),
                    json.dumps(list(approvers)),
                    required,
                    int(self_forbidden),
                    window_minutes,
                    now,
                    now + seconds,
                    None if result is None else self.sealed.seal(request_id, result),
                    "[]",
                    json.dumps(list(agents)),
                    confirmer or "",
                    task,
                ),
            )
            made = self.get(request_id)
        assert made is not None
        return made, True

    def _pending(
        self, kind: str, binding: str, now: float, decision_id: str | None
    ) -> ApprovalRequest | None:
        run = "" if decision_id is None else " AND decision_id = ?"
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM approval_requests WHERE binding = ? AND kind = ?"
            f" AND status = ? AND expires_at > ?{run} ORDER BY created_at DESC LIMIT 1",
            (binding, kind, OPEN, now, *(() if decision_id is None else (decision_id,))),
        )
        return self._request(rows[0]) if rows else None

    def get(self, request_id: str) -> ApprovalRequest | None:
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM approval_requests WHERE id = ?", (request_id,)
        )
        return self._request(rows[0]) if rows else None

    def locked(self, request_id: str) -> ApprovalRequest | None:
        """Inside a transaction: the request, read under a lock on it held to the end of the
        transaction, so that every process takes its answers one at a time (PostgreSQL: the
        row, ``FOR UPDATE``; SQLite's writers take turns already)."""
        lock = " FOR UPDATE" if self.db.is_postgres else ""
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM approval_requests WHERE id = ?{lock}", (request_id,)
        )
        return self._request(rows[0]) if rows else None

    def latest(self, kind: str, binding: str) -> ApprovalRequest | None:
        """The newest request of this kind for the call ``binding`` names, in whatever state."""
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM approval_requests WHERE binding = ? AND kind = ?"
            " ORDER BY created_at DESC LIMIT 1",
            (binding, kind),
        )
        return self._request(rows[0]) if rows else None

    def of_run(self, kind: str, binding: str, decision_id: str) -> ApprovalRequest | None:
        """The request of this kind for the call ``binding`` names that goes with the run
        ``decision_id``: the approval that run spent (``used_by``), or the review holding its
        result (``decision_id``)."""
        column = "used_by" if kind == "approval" else "decision_id"
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM approval_requests WHERE binding = ? AND kind = ?"
            f" AND {column} = ? ORDER BY created_at DESC LIMIT 1",
            (binding, kind, decision_id),
        )
        return self._request(rows[0]) if rows else None

    def awaiting_delivery(
        self, approval_binding: str, review_binding: str, now: float
    ) -> tuple[ApprovalRequest, ApprovalRequest] | None:
        """The oldest run of a call that an approval unlocked whose result a review still holds
        for it (pending or released, not expired): that approval and that review."""
        rows = self.db.execute(
            "SELECT a.id, r.id FROM approval_requests r JOIN approval_requests a"
            " ON a.used_by = r.decision_id"
            " WHERE r.binding = ? AND r.kind = 'review' AND r.status IN (?, 'released')"
            " AND r.expires_at > ? AND a.binding = ? AND a.kind = 'approval' AND a.status = 'used'"
            " ORDER BY r.created_at LIMIT 1",
            (review_binding, OPEN, now, approval_binding),
        )
        if not rows:
            return None
        approval, review = self.get(rows[0][0]), self.get(rows[0][1])
        return (approval, review) if approval is not None and review is not None else None

    def listed(
        self, *, status: str | None = None, approver: str | None = None, limit: int = 100
    ) -> list[ApprovalRequest]:
        """Requests, newest first; with ``approver``, those that name the person (among the
        approvers, or as the one who confirms the call where none is named)."""
        sql = f"SELECT {_COLUMNS} FROM approval_requests"
        where, params = [], []
        if status is not None:
            where.append("status = ?")
            params.append(status)
        if approver is not None:
            # Filtered in the database, so that requests for other people (anyone's calls may
            # be held) never push this person's off a bounded list: the approvers' JSON list
            # holds the name as json.dumps writes it; matched exactly below (SQLite's LIKE
            # ignores the case of ASCII letters).
            where.append("(approvers LIKE ? ESCAPE '\\' OR (approvers = '[]' AND confirmer = ?))")
            params += [f"%{_like_literal(json.dumps(approver))}%", approver]
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC LIMIT ?"
        found = []
        offset = 0
        while True:
            rows = self.db.execute(sql + " OFFSET ?", (*params, limit, offset))
            found += [r for r in map(self._request, rows) if approver is None or r.names(approver)]
            offset += len(rows)
            if len(found) >= limit or len(rows) < limit:
                return found[:limit]

    def pending(
        self, *, made_before: float, after: tuple[float, str] | None, limit: int
    ) -> list[ApprovalRequest]:
        """At most ``limit`` pending requests, not expired, made before ``made_before``, oldest
        first (by creation, then id), after ``after`` (a request's ``created_at`` and ``id``) or
        from the first."""
        sql = (
            f"SELECT {_COLUMNS} FROM approval_requests"
            " WHERE status = ? AND expires_at > ? AND created_at <= ?"
        )
        params: list[Any] = [OPEN, self.clock(), made_before]
        if after is not None:
            sql += " AND (created_at > ? OR (created_at = ? AND id > ?))"
            params += [after[0], after[0], after[1]]
        rows = self.db.execute(sql + " ORDER BY created_at, id LIMIT ?", (*params, limit))
        return [self._request(r) for r in rows]

    def answer(self, request_id: str, answer: Answer) -> None:
        """Record one person's answer (a second answer by the same person replaces nothing:
        `ValueError`). One statement, so two answers at once from two processes (a page and
        the CLI, two replicas) cannot both pass a check made before either wrote."""
        rows = self.db.execute(
            "INSERT INTO approval_answers"
            " (request_id, approver, answer, minutes, channel, reason, at, withheld_fields)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (request_id, approver) DO NOTHING RETURNING request_id",
            (
                request_id,
                answer.approver,
                answer.answer,
                answer.minutes,
                answer.channel,
                answer.reason,
                answer.at,
                json.dumps(list(answer.withheld_fields)),
            ),
        )
        if not rows:
            raise ValueError(f"{answer.approver} has already answered this request")

    def resolve(
        self,
        request_id: str,
        status: str,
        *,
        from_status: str = OPEN,
        withheld_fields: tuple[str, ...] = (),
    ) -> bool:
        """Move a request from ``from_status`` to ``status``; False if it was no longer in
        ``from_status`` (answered or used meanwhile). Any status but released deletes a held
        result."""
        return resolve_request(
            self.db,
            request_id,
            status,
            from_status=from_status,
            at=self.clock(),
            withheld_fields=withheld_fields,
        )

    def use(
        self,
        request_id: str,
        decision_id: str,
        *,
        from_status: str,
        running_until: float | None = None,
    ) -> bool:
        """Mark an approved (or released) request used by the call ``decision_id`` unlocked:
        once only, whoever tries at the same time, and not once it has expired. A delivered
        result is deleted. With
        ``running_until``, the run it unlocked is marked in progress until then (`end_run`),
        in the same statement: no retry finds the approval spent and its run not marked."""
        to = "used" if from_status == "approved" else "delivered"
        now = self.clock()
        # Not past its expiry either: the call found it in force an instant before (`check`).
        rows = self.db.execute(
            "UPDATE approval_requests SET status = ?, used_at = ?, used_by = ?, result = NULL,"
            " running_until = ? WHERE id = ? AND status = ? AND expires_at > ? RETURNING id",
            (to, now, decision_id, running_until, request_id, from_status, now),
        )
        return bool(rows)

    def end_run(self, request_id: str, decision_id: str) -> bool:
        """The run of the call ``decision_id`` that ``request_id`` was spent on has ended (it
        answered, or failed); False if it was not marked in progress (another run's, or ended
        already)."""
        rows = self.db.execute(
            "UPDATE approval_requests SET running_until = NULL"
            " WHERE id = ? AND used_by = ? AND running_until IS NOT NULL RETURNING id",
            (request_id, decision_id),
        )
        return bool(rows)

    def renew_run(self, request_id: str, decision_id: str, running_until: float) -> bool:
        """The run of the call ``decision_id`` that ``request_id`` was spent on is still in
        flight: marked in progress until ``running_until`` now. One statement, and only while
        that run is marked (used by that call and not ended: an ended run, or an approval given
        back, is never marked again); False if it is not."""
        rows = self.db.execute(
            "UPDATE approval_requests SET running_until = ?"
            " WHERE id = ? AND used_by = ? AND status = 'used' AND running_until IS NOT NULL"
            " RETURNING id",
            (running_until, request_id, decision_id),
        )
        return bool(rows)

    def unspend(self, request_id: str, decision_id: str) -> bool:
        """Move an approval the call ``decision_id`` spent back to approved (its expiry as it
        was, no longer used nor in progress): that call's run never reached the upstream. One
        statement, and only while it is that call's: False if it is not (not used, or used by
        another call)."""
        rows = self.db.execute(
            "UPDATE approval_requests SET status = 'approved', used_at = NULL, used_by = NULL,"
            " running_until = NULL WHERE id = ? AND status = 'used' AND used_by = ?"
            " RETURNING id",
            (request_id, decision_id),
        )
        return bool(rows)

    def held_result(self, request_id: str) -> Any:
        rows = self.db.execute("SELECT result FROM approval_requests WHERE id = ?", (request_id,))
        return self.sealed.open(request_id, rows[0][0]) if rows else None

    def drop_expired_results(self) -> int:
        """Delete the held results of requests past their expiry (their status is settled
        when the call comes back, or shown as expired); returns how many went."""
        rows = self.db.execute(
            "UPDATE approval_requests SET result = NULL"
            " WHERE result IS NOT NULL AND expires_at <= ? RETURNING id",
            (self.clock(),),
        )
        return len(rows)

    def _answers(self, request_id: str) -> tuple[Answer, ...]:
        rows = self.db.execute(
            "SELECT approver, answer, minutes, channel, reason, at, withheld_fields"
            " FROM approval_answers WHERE request_id = ? ORDER BY at",
            (request_id,),
        )
        return tuple(Answer(*r[:6], tuple(json.loads(r[6]))) for r in rows)

    def _request(self, row: tuple) -> ApprovalRequest:
        request_id = row[0]
        request = ApprovalRequest(
            id=request_id,
            kind=row[1],
            status=row[2],
            binding=row[3],
            subject=row[4],
            client_id=row[5],
            server=row[6],
            method=row[7],
            action=row[8],
            target=row[9],
            arguments_digest=row[10],
            arguments=self.sealed.open(request_id, row[11]),
            policy_version=row[12],
            decision_id=row[13],
            rules=tuple(json.loads(row[14])),
            approvers=tuple(json.loads(row[15])),
            required=row[16],
            self_forbidden=bool(row[17]),
            window_minutes=row[18],
            created_at=row[19],
            expires_at=row[20],
            resolved_at=row[21],
            used_at=row[22],
            used_by=row[23],
            withheld_fields=tuple(json.loads(row[25])),
            agents=tuple(json.loads(row[26])),
            confirmer=row[27] or None,
            running_until=row[28],
            answers=self._answers(request_id),
            task=row[29],
        )
        if row[27] is None and request.person:  # kept before confirmers were
            request = replace(request, confirmer=request.subject)
        return request
