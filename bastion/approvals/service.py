"""The approval model: hold a call or a result, ask the policy who may answer, take answers,
and tell the enforcement point, when the call comes again, whether it may go on.

The policy stays authoritative. A held call is decided again in full when it comes back; an
approval only satisfies ``requires_approval`` for the exact call it was given for (same user,
agent, chain of agents for a delegated token, task the token is for, server, method, target and
arguments, same policy version), once, before it expires; a reviewed result is delivered only to
that very call.
Who may answer is policy too (the contract's ``approver``, ``approvals_required``,
``approval_expires``, ``approval_window`` and ``self_approval_forbidden`` rules, see
docs/approvals.md). An approval for N minutes is a fact, ``approval_grant(user, agent, action,
resource)`` (its agent naming the chain and task, `approval_grant_agent`), stored with an expiry: the policy sees it and it is revoked like any fact.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio

from bastion.agents import identity
from bastion.approvals.settings import MAX_WINDOW_MINUTES, ApprovalSettings
from bastion.approvals.store import OPEN, Answer, ApprovalRequest, ApprovalStore, TooManyPending
from bastion.audit.log import AuditLog
from bastion.db import round_failed
from bastion.decide import Authorizer, Session
from bastion.decide.contract import approval_grant_agent, path_keys
from bastion.facts.model import Entity, FactError
from bastion.facts.store import FactStore, StoredFact, check_storable
from bastion.large_json import LargeMessage
from bastion.names import is_name, readable
from bastion.policy.errors import EvaluationLimit, UndecidedQuestion
from bastion.retries import Outage
from bastion.signals.suspensions import (
    Suspensions,
    describe,
    has_person,
    lock_suspensions,
    stored_hold,
    token_principals,
)

if TYPE_CHECKING:
    from bastion.approvals.webhooks import WebhookNotifier

log = logging.getLogger("bastion.approvals")

GRANT = "approval_grant"
# Statuses in which a request still counts, until its expiry.
_LIVE = (OPEN, "approved", "released")
# The most approvals a call may need, whatever the policy says: the number is kept in an
# INTEGER column, 32 bits on PostgreSQL (a policy's 3,000,000,000 was a failed write there).
# A call needing this many still waits for more answers than anyone gives.
MAX_REQUIRED = 1000
# The longest reason an answer gives, the most fields a release withholds, and the longest
# path of one (whichever way the answer comes: the API, a page, the CLI).
MAX_REASON = 2000
MAX_WITHHELD = 100
MAX_PATH = 256
_SUSPENDED = "{person} is suspended (the kill switch): a suspended user answers no request"


def answer_problem(reason: str, withheld_fields: tuple[str, ...]) -> str | None:
    """Why an answer's reason or withheld fields cannot be kept, or None."""
    if len(reason) > MAX_REASON:
        return f"a reason holds at most {MAX_REASON} characters, got {len(reason)}"
    if len(withheld_fields) > MAX_WITHHELD:
        return f"at most {MAX_WITHHELD} fields can be withheld, got {len(withheld_fields)}"
    for path in withheld_fields:
        if not isinstance(path, str) or not 0 < len(path) <= MAX_PATH:
            return (
                f'a withheld field is a path such as "customers.*.email" (1 to {MAX_PATH}'
                f" characters), got {path!r:.80}"
            )
    return None


class Unavailable(Exception):
    """What the policy says cannot be read here now (this replica is behind the database, or
    the policy in force does not load on it): nothing is answered or shown on what it holds.
    The message says why."""


async def _current() -> None:
    """Nothing to wait for (one process, no replicas)."""


class NotAllowed(Exception):
    """This person may not give this answer; the message says why."""


class UnmatchedField(NotAllowed):
    """A field a reviewer would withhold names nothing in the held result as they may see it
    (a mistyped path), or cannot be read as a path: nothing is answered or released. The
    message names each such path."""


class UnknownRequest(Exception):
    """No approval request has this id."""


class NoApprover(Exception):
    """Nobody could ever answer this hold. The enforcement point refuses the call at once
    rather than hold it for nobody: ``reason`` is its refusal's reason, ``meaning`` what the
    agent is told of it; the message says what to configure (`nobody_behind`,
    `self_forbidden`, `unable`, `too_few`, `over_budget`), or, of a pending request nobody may
    answer any more (`Approvals.stranded`), what changed (`owner_replaced`). ``suspended``: the
    agent, user or session the kill switch holds, where it refused the hold (`suspended`): the
    enforcement point refuses the call as its kill switch does."""

    def __init__(
        self,
        message: str,
        meaning: str,
        reason: str = "no_approver",
        suspended: Entity | None = None,
    ) -> None:
        super().__init__(message)
        self.meaning = meaning
        self.reason = reason
        self.suspended = suspended

    @classmethod
    def nobody_behind(cls, agent: str) -> NoApprover:
        """No approver rule names a person, and no person stands behind the call (an agent
        acting as itself) to confirm it, nor an owner of that agent who is a bastion user."""
        return cls(
            f"nobody can approve this call: no approver rule of the policy names a person for"
            f" it, and the agent {agent!r} acts as itself (no person signed in) with no owner"
            f" who is a bastion user to confirm it; add an approver rule, or give the agent an"
            f" owner (bastion agents update {agent} --owner USER)",
            "nobody can approve it: no approver rule of the policy names a person for it, and"
            " its agent acts as itself (no person signed in) with no owner who is a bastion"
            " user to confirm it; an administrator adds an approver rule to the policy, or"
            " gives the agent an owner (bastion agents update CLIENT_ID --owner USER)",
        )

    @classmethod
    def too_many_pending(cls, most: int) -> NoApprover:
        """The agent has ``most`` calls waiting for people already: held, the call would ask
        them once more (an agent varying its arguments could ask without end)."""
        return cls(
            f"this agent has {most} calls waiting for people already"
            " ([approvals] max_pending_per_agent): nobody is asked about another until one is"
            " answered or expires",
            f"this agent has {most} calls waiting for people already: wait for them to be"
            " answered or to expire, then call again",
            "approval_limit",
        )

    @classmethod
    def owner_replaced(cls, agent: str) -> NoApprover:
        """The owner who was to confirm a pending call of an agent acting as itself is not its
        owner any more, and nobody else may answer it: the new owner confirms the call sent
        again, not the request made for the old one."""
        return cls(
            f"nobody can approve this request any more: the owner of the agent {agent!r} who"
            f" was to confirm it is not its owner now, and no approver rule names anyone else;"
            f" the call sent again is held for its owner now",
            "nobody can approve it any more: the owner of its agent who was to confirm it is"
            " another now; send the call again to ask the agent's owner now",
        )

    @classmethod
    def self_forbidden(cls, call: Call, confirmer: str) -> NoApprover:
        """The person who would confirm the call (its user, or the owner of the agent acting
        as itself) may not (``self_approval_forbidden``), and no approver rule names anyone
        else."""
        who = (
            f"its user {confirmer!r}"
            if call.person
            else f"{confirmer!r}, the owner of the agent {call.subject!r} acting as itself,"
        )
        return cls(
            f"nobody can approve this call: the policy forbids approving one's own call here"
            f" (self_approval_forbidden), so {who} may not confirm it, and no approver rule of"
            f" the policy names anyone else for it; add an approver rule naming who approves it",
            "nobody can approve it: self-approval is forbidden by the policy for this call, and"
            " no approver rule of the policy names anyone else for it; an administrator adds an"
            " approver rule to the policy",
        )

    @classmethod
    def unable(cls, states: set[str]) -> NoApprover:
        """Everyone who could answer (the approvers the rules name, or the person who confirms
        the call) answers nothing now: ``states``, disabled or suspended (`Approvals._standing`).
        Nobody is named: the agent is told no more than the other refusals tell it."""
        why = " or ".join(sorted(states))
        return cls(
            f"nobody can approve this call: every person who may approve it is {why}; enable"
            f" (bastion users enable USER) or resume (bastion agents resume USER --kind user)"
            f" one of them, or add an approver rule naming someone else",
            f"nobody can approve it: every person who may approve it is {why}; an"
            f" administrator enables or resumes one of them, or names another approver in the"
            f" policy",
        )

    @classmethod
    def too_few(cls, required: int, able: int, states: set[str]) -> NoApprover:
        """The call needs more approvals (``approvals_required``) than the approvers the rules
        name, less those who answer nothing now (``states``), could give."""
        others = f", the others being {' or '.join(sorted(states))}" if states else ""
        return cls(
            f"nobody can approve this call: it needs {required} approvals (approvals_required)"
            f" and only {able} of the people who may approve it can give one{others}; name more"
            f" approvers, {'enable or resume them, ' if states else ''}or require fewer",
            "nobody can approve it: it needs more approvals (approvals_required) than the"
            " people who may approve it can give; an administrator names more approvers in the"
            " policy, or requires fewer",
        )

    @classmethod
    def over_budget(cls, limit: EvaluationLimit) -> NoApprover:
        """The rules on who may answer spent the evaluation budget: under the narrowest terms
        (`Approvals._terms_in`) nobody may. Fail closed, as any decision over budget is."""
        return cls(
            f"nobody can approve this call: the policy's approver rules for it (approver,"
            f" approvals_required, self_approval_forbidden, approval_window, approval_expires)"
            f" spent the evaluation budget ({limit}); simplify them, or raise the limit",
            "nobody can approve it: the policy's approver rules for it ran out of their"
            " evaluation budget; an administrator simplifies them (docs/policy-language.md)",
            reason=EvaluationLimit.reason,
        )

    @classmethod
    def suspended(cls, held: Entity) -> NoApprover:
        """The kill switch holds the call: a suspension is stored that this replica had not
        heard of when it passed the call (`stored_hold`). Nobody answers such a call, and no
        request is kept for the suspension to miss: one would be used after the resume."""
        return cls(
            f"the kill switch holds this call: {describe(held)} is suspended (stored before"
            " this replica had heard of it); nothing is held for people",
            "the kill switch holds this call: an agent or user behind it is suspended",
            reason="suspended",
            suspended=held,
        )

    @classmethod
    def undecided(cls, predicate: str) -> NoApprover:
        """A rule on answering the call whose holding restricts (``approvals_required``,
        ``approval_expires``, or an ``approval_window`` where another gives a window: its
        minutes may shorten it) cannot say its value (`UndecidedQuestion`): under the narrowest
        terms nobody may answer. Fail closed, as the decision contract refuses it."""
        return cls(
            f"nobody can approve this call: the policy's {predicate} rule for it cannot be"
            f" decided (a value of another kind, or arithmetic with no result, bound or passed"
            f" on); compare the values it computes directly, or require their kind",
            f"nobody can approve it: the policy's {predicate} rule for it cannot be decided for"
            f" this request; an administrator corrects the rule (docs/policy-language.md)",
            reason=UndecidedQuestion.reason,
        )


@dataclass(frozen=True, slots=True)
class Call:
    """The call (or result) being held, as the enforcement point saw it."""

    kind: str  # "approval" or "review"
    subject: str
    client_id: str
    server: str
    method: str
    action: str
    resource: Entity
    arguments: Any
    arguments_digest: str
    # A delegated token's agents, first to calling (`Caller.agents`); empty for a direct grant.
    agents: tuple[str, ...] = ()
    task: str = ""  # the task the token is for (`Caller.task`); "" for none

    @property
    def chain(self) -> tuple[str, ...]:
        """The agents of the call, first to calling (``client_id`` alone for a direct grant)."""
        return self.agents or (self.client_id,)

    @property
    def person(self) -> bool:
        """Whether a person stands behind the call (`has_person`): then they confirm it."""
        return has_person(token_principals(self.subject, self.chain))


@dataclass(frozen=True, slots=True)
class Outcome:
    """What `Approvals.check` found for a call.

    ``state``: "hold" (no request counts: hold it), "pending", "approved" (an unused approval for
    this exact call; use it), "in_progress" (of an approval: it was spent on this very call,
    whose run is still upstream; the call does not run again, nor is it held for a new
    approval), "reviewing" (of an approval: it was spent on this very call, whose result
    ``review`` holds; the review decides, the call does not run again), "released" (a
    reviewed result to deliver) or "refused" (``reason`` says why: approval_denied,
    approval_expired, approval_mismatch, approval_used, review_withheld, review_expired;
    no_approver or evaluation_limit: nobody may answer the pending request any more, closed
    now, and ``nobody`` says why).
    """

    state: str
    request: ApprovalRequest | None = None
    reason: str = ""
    review: ApprovalRequest | None = None
    nobody: NoApprover | None = None


@dataclass(frozen=True, slots=True)
class Terms:
    """What the policy says about answering one held call."""

    approvers: tuple[str, ...]
    required: int
    self_forbidden: bool
    window_minutes: int
    seconds: float
    # The budget the rules spent when they were read (then the terms are the narrowest).
    over_budget: EvaluationLimit | None = None
    # The rule that could not be decided when they were read (then too, the narrowest).
    undecided: str | None = None


@dataclass(frozen=True, slots=True)
class _Reading:
    """The policy's say on answering one request, read once (`Approvals._read`): the terms,
    and why each person asked about may not answer under them (None: they may)."""

    terms: Terms
    refusals: dict[str, str | None]


class Approvals:
    def __init__(
        self,
        store: ApprovalStore,
        facts: FactStore,
        authorizer: Callable[[], Authorizer],
        policy_version: Callable[[], int | None],
        settings: ApprovalSettings,
        base_url: str,
        binding_key: bytes,
        audit: AuditLog,
        clock: Callable[[], float] = time.time,
        current: Callable[[], Awaitable[None]] = _current,
        *,
        user_state: Callable[[str], str | None] = lambda person: None,
        suspensions: Suspensions | None = None,
    ) -> None:
        """``authorizer`` raises `Unavailable` while what it holds must not decide; ``current``
        waits for the changes this process has heard of (raising `Unavailable` if they do not
        come in time): awaited before an answer or a reviewer's view is worked out.
        ``user_state`` is a person's state as the authorization server holds it
        (`OAuthStore.user_state`) and ``suspensions`` the kill switch's view: a disabled or
        suspended person answers nothing (`may_answer`)."""
        self.user_state = user_state
        self.suspensions = suspensions
        self.store = store
        self.facts = facts
        self.authorizer = authorizer
        self.current = current
        self.policy_version = policy_version
        self.settings = settings
        self.base_url = base_url.rstrip("/")
        self._keyed = hmac.new(binding_key, digestmod=hashlib.sha256)
        self.audit = audit
        self.clock = clock
        # Told of each new request (webhooks), inside the transaction that makes it: what they
        # write on the approvals' database goes with the request, and one that fails undoes it.
        self.on_new_request: list[Callable[[ApprovalRequest], None]] = []
        # Sends them to the configured webhooks; started and closed with the server.
        self.webhooks: WebhookNotifier | None = None
        # Where the last pass of `sweep_stranded` stopped (a request's created_at and id).
        self._swept_to: tuple[float, str] | None = None

    # -- the enforcement point's side ---------------------------------------------------------

    def binding(self, call: Call) -> str:
        """A keyed digest naming the exact call: two calls share it only if they are the same."""
        mac = self._keyed.copy()
        parts = [
            call.kind,
            call.subject,
            call.client_id,
            call.server,
            call.method,
            repr(call.resource),
            call.arguments_digest,
        ]
        if call.agents:
            # A sub-agent working for two agents is two callers: what is approved or released
            # for one chain is not the other's. (A direct grant's binding is as it always was,
            # so requests pending across an upgrade are still found.)
            parts.append(list(call.agents))
        if call.task:
            # The task a token is for is part of who calls: what is approved or released for
            # a call under one task is not the same call's under another, nor under none. (A
            # call under no task is bound as it always was: requests pending across an upgrade
            # are still found by calls under no task.)
            parts.append({"task": call.task})
        mac.update(json.dumps(parts, separators=(",", ":")).encode())
        return mac.hexdigest()

    def url(self, request_id: str) -> str:
        return f"{self.base_url}/approvals/{request_id}"

    def check(self, call: Call, request_id: str | None = None) -> Outcome:
        """Where this call stands. ``request_id``: the request the client says it retries (a
        2026-07-28 ``requestState``, or the hold answered while it waited); it must name this
        very call, and may be of either kind: a call held for approval whose result is held for
        review comes back naming its approval or its review (docs/approvals.md)."""
        binding = self.binding(call)
        if request_id is not None:
            request = self._settled(self.store.get(request_id))
            if request is None or request.binding != self.binding(replace(call, kind=request.kind)):
                return Outcome("refused", request, "approval_mismatch")
            if request.kind != call.kind:
                if call.kind == "approval":  # the review of this call: of the run it unlocked?
                    return self._reviewing(call, request)
                # The approval of this call, named to its review step: the review of the run it
                # unlocked, or (not spent) the call's latest review.
                request_id, request = (
                    None,
                    self._settled(
                        self.store.latest(call.kind, binding)
                        if request.used_by is None
                        else self.store.of_run("review", binding, request.used_by)
                    ),
                )
        else:
            if call.kind == "approval" and (delivering := self._awaiting_delivery(call)):
                return delivering
            request = self._settled(self.store.latest(call.kind, binding))
        if request is None:
            return Outcome("hold")
        request, nobody = self._close_if_stranded(request)
        if nobody is not None:
            return Outcome("refused", request, nobody.reason, nobody=nobody)
        now = self.clock()
        prefix = "approval" if call.kind == "approval" else "review"
        if request.status in _LIVE and request.expires_at <= now:
            with self.store.db.transaction():
                self.store.resolve(request.id, "expired", from_status=request.status)
                self._event(request, f"{prefix}.expired")
            return Outcome("refused", request, f"{prefix}_expired")
        if request.status == OPEN:
            return Outcome("pending", request)
        if request.status == "approved":
            if request.policy_version != (self.policy_version() or 0):
                # Approved under other rules: what the person saw is no longer what decides.
                with self.store.db.transaction():
                    self.store.resolve(request.id, "void", from_status="approved")
                    self._event(request, "approval.void", reason="policy version changed")
                return Outcome("refused", request, "approval_mismatch")
            return Outcome("approved", request)
        if request.status == "released":
            return Outcome("released", request)
        if request.status in ("denied", "withheld") and now < request.expires_at:
            # A refusal stands until the request would have expired: asking again at once is
            # not a way around it.
            reason = "approval_denied" if request.status == "denied" else "review_withheld"
            return Outcome("refused", request, reason)
        if request.status == "used" and request.used_by is not None:
            review = self._settled(
                self.store.of_run(
                    "review", self.binding(replace(call, kind="review")), request.used_by
                )
            )
            if (
                review is not None
                and review.status in (OPEN, "released", "withheld")
                and now < review.expires_at
            ):
                # The call this approval unlocked ran, and its result stands under review: the
                # retry is that call's, not a new one to approve.
                return Outcome("reviewing", request, review=review)
            if request.running(now):
                # The call this approval unlocked is still upstream (nothing holds its result
                # yet): the retry is that call's too. Held for a new approval, it would ask the
                # people again, who could not tell it from a new call, and run it again.
                return Outcome("in_progress", request)
        if request_id is not None:
            reason = {"used": "approval_used", "delivered": "approval_used"}.get(
                request.status, f"{prefix}_expired"
            )
            return Outcome("refused", request, reason)
        return Outcome("hold")

    def _reviewing(self, call: Call, review: ApprovalRequest) -> Outcome:
        """What a retry naming ``review``, a review of ``call``, makes of the call's approval
        step: "reviewing" if the review holds the result of a run an approval of this call
        unlocked (the decision that spent it is the one that held the result), whatever
        approvals of the call were asked for or given since; else refused."""
        approval = self._settled(
            self.store.of_run("approval", self.binding(call), review.decision_id)
        )
        if approval is None or approval.status != "used":
            return Outcome("refused", review, "approval_mismatch")
        return Outcome("reviewing", approval, review=review)

    def _awaiting_delivery(self, call: Call) -> Outcome | None:
        """For a retry that names nothing: the oldest run of ``call`` an approval unlocked whose
        result a review still holds (pending or released), as "reviewing". That run's result is
        delivered before the call runs again (an approval asked for, or given, while that run
        was upstream waits for the next retry). None if there is no such run."""
        found = self.store.awaiting_delivery(
            self.binding(call), self.binding(replace(call, kind="review")), self.clock()
        )
        if found is None:
            return None
        approval, review = found
        review = self._settled(review)
        if review is None or review.status not in (OPEN, "released"):
            return None
        return Outcome("reviewing", approval, review=review)

    def hold(
        self,
        call: Call,
        decision_id: str,
        rules: tuple[str, ...],
        context: dict[str, Any],
        result: Any = None,
    ) -> ApprovalRequest:
        """The pending request for this call, made (and announced) if there is none.

        The request, its audit event and its announcement (`on_new_request`: the webhooks'
        outbox rows) are one transaction: a process killed in between leaves no request that
        nothing will announce (the agent's retry finds a request pending, and makes none). An
        announcement that cannot be queued raises, and nothing is kept: the gateway refuses the
        call (``approval_unavailable``), and holds it again when it comes back. `NoApprover`
        when nobody could answer it (`answerers`), or when its agent has
        ``max_pending_per_agent`` calls waiting already (an identical call's request is still
        found): nothing is kept; `NoApprover.suspended` when the kill switch holds the call,
        stored though this replica had not heard of it yet (`stored_hold`, asked under the kill
        switch's lock: a suspension written meanwhile waits for the request, and takes it back).
        """
        terms, confirmer = self.answerers(call, context)
        most = self.settings.max_pending_per_agent if call.kind == "approval" else None
        try:
            with self.store.db.transaction():
                lock_suspensions(self.store.db, shared=True)
                suspended = stored_hold(self.facts, token_principals(call.subject, call.chain))
                if suspended is not None:
                    raise NoApprover.suspended(suspended)
                request, made = self.store.create(
                    kind=call.kind,
                    binding=self.binding(call),
                    subject=call.subject,
                    client_id=call.client_id,
                    server=call.server,
                    method=call.method,
                    action=call.action,
                    target=repr(call.resource),
                    arguments_digest=call.arguments_digest,
                    arguments=call.arguments,
                    policy_version=self.policy_version() or 0,
                    decision_id=decision_id,
                    rules=rules,
                    approvers=terms.approvers,
                    required=terms.required,
                    self_forbidden=terms.self_forbidden,
                    window_minutes=terms.window_minutes,
                    seconds=terms.seconds,
                    result=result,
                    agents=call.agents,
                    confirmer=confirmer,
                    max_pending=most,
                    task=call.task,
                )
                if made:
                    self._event(request, f"{call.kind}.requested", decision_id=decision_id)
                    for hook in self.on_new_request:
                        hook(request)
        except TooManyPending:
            raise NoApprover.too_many_pending(most or 0) from None
        return request

    def use(self, request: ApprovalRequest, decision_id: str, runs_for: float = 0.0) -> bool:
        """Spend an approval (or deliver a released result) for the call ``decision_id``; False
        if it was spent already (two retries at once: one goes through). ``runs_for``: the
        longest the call an approval unlocks may stay upstream; until `run_ended` says it has
        ended, or that long, the same call is told its run is in progress (`check`)."""
        from_status = "approved" if request.kind == "approval" else "released"
        running_until = (
            self.clock() + runs_for if runs_for > 0 and request.kind == "approval" else None
        )
        with self.store.db.transaction():
            used = self.store.use(
                request.id, decision_id, from_status=from_status, running_until=running_until
            )
            if used:
                kind = "approval.used" if request.kind == "approval" else "review.delivered"
                self._event(request, kind, decision_id=decision_id)
        return used

    def run_ended(self, request_id: str, decision_id: str) -> None:
        """The run of the call ``decision_id``, which spent the approval ``request_id``, has
        ended: it answered (its result held for review first, where it is), or failed. The
        same call is then what it was before: a result to review, or a new call."""
        self.store.end_run(request_id, decision_id)

    def renew_run(self, request_id: str, decision_id: str, runs_for: float) -> bool:
        """The run of the call ``decision_id``, which spent the approval ``request_id``, is still
        in flight in this process: the same call is told its run is in progress for
        ``runs_for`` from now (a lease, renewed while the run lasts: a process that dies stops
        renewing, and the mark lapses). False if that run is no longer marked (ended, given
        back)."""
        return self.store.renew_run(request_id, decision_id, self.clock() + runs_for)

    def unspend(
        self, request: ApprovalRequest, decision_id: str, cause: str, message: str = ""
    ) -> bool:
        """Give back the approval ``request`` that the call ``decision_id`` spent on a run that
        failed before anything of it left bastion (``cause``: the class of the error, and
        ``message`` bastion's message for it): approved again as it was, for the retry, with
        its audit event. False if it is no longer spent by that call."""
        with self.store.db.transaction():
            given_back = self.store.unspend(request.id, decision_id)
            if given_back:
                self._event(
                    request,
                    "approval.unspent",
                    decision_id=decision_id,
                    error=cause,
                    message=message,
                )
        return given_back

    def held_result(self, request: ApprovalRequest) -> Any:
        return self.store.held_result(request.id)

    async def drop_expired_results_forever(self, seconds: float = 60.0) -> None:
        """Delete held results once their request expires, every ``seconds``, until cancelled.
        A failure is logged once for as long as it stays the same (`round_failed`), and once
        that the round works again."""
        outage = Outage(log)
        while True:
            try:
                await anyio.to_thread.run_sync(self.store.drop_expired_results)
            except Exception as e:  # the database is away: the next round tries again
                round_failed(outage, e, "approvals: expired results could not be deleted")
            else:
                outage.ended("approvals: expired results are deleted again")
            await anyio.sleep(seconds)

    def sweep_stranded(self) -> int:
        """One pass of the sweep: close the pending requests nobody may answer any more
        (`_close_if_stranded`, as when one is looked at: one outcome and one audit event,
        whichever process closes it), looking at ``stranded_sweep_limit`` of them at most, the
        next after those of the last pass (oldest first; from the first again once all were
        seen). A request younger than ``stranded_sweep_seconds`` waits for the next pass: a
        replica behind the one that held it may not have read the facts it was held under yet.
        Returns how many it closed. Reads the database and the policy: off the event loop."""
        limit = self.settings.stranded_sweep_limit
        made_before = self.clock() - self.settings.stranded_sweep_seconds
        found = self.store.pending(made_before=made_before, after=self._swept_to, limit=limit)
        closed = 0
        for request in found:
            if self._close_if_stranded(self._settled(request))[1] is not None:
                closed += 1
        # Moved on only once the pass is done: one the policy could not be read for is retried.
        self._swept_to = (found[-1].created_at, found[-1].id) if len(found) == limit else None
        return closed

    async def sweep_stranded_forever(self) -> None:
        """`sweep_stranded` every ``stranded_sweep_seconds``, once this replica has the changes
        it has heard of (`current`), until cancelled. Where the policy cannot be read here
        (`Unavailable`), the pass waits for the next."""
        outage = Outage(log)
        while True:
            try:
                await self.current()
                await anyio.to_thread.run_sync(self.sweep_stranded)
            except Unavailable as e:
                log.debug("approvals: no sweep of stranded requests on this replica now: %s", e)
            except Exception as e:  # the database is away: the next pass tries again
                round_failed(outage, e, "approvals: stranded requests could not be swept")
            else:
                outage.ended("approvals: stranded requests are swept again")
            await anyio.sleep(self.settings.stranded_sweep_seconds)

    def reviewer_masks(self, request: ApprovalRequest, person: str) -> tuple[str, ...]:
        """The mask paths the policy puts on what ``person`` sees of ``request``'s held result:
        the contract's ``mask(actor, action, resource, path)`` with the reviewer as the actor.
        A path that is not a string, a policy over its budget, or a mask rule whose paths cannot
        be named (`UndecidedQuestion`), is "", which withholds the whole result (fail closed)."""
        resource = Entity.parse(request.target)
        try:
            with self.authorizer().session(_call_context(request, self.clock())) as s:
                paths = s.rows("mask", "bbbf", Entity("User", person), request.action, resource)
        except (EvaluationLimit, UndecidedQuestion):
            return ("",)
        return tuple(sorted({p if isinstance(p, str) else "" for p in paths}))

    def review_view(self, request: ApprovalRequest, person: str) -> Any:
        """The result held by ``request`` as the reviewer ``person`` may see it, masked by the
        policy for them (`reviewer_masks`); None when no result is held (any more)."""
        # Masking MCP results is the gateway's (it knows their shapes); imported here, where it
        # is used, so that loading approvals/ does not load gateway/ (DESIGN.md: new rooms do
        # not depend on gateway/). The lead may move masks below both rooms.
        from bastion.gateway.masks import compile_paths, mask_result

        result = self.held_result(request)
        if result is None:
            return None
        paths = compile_paths(self.reviewer_masks(request, person))
        if not isinstance(result, dict):
            # Not an MCP result: nothing says which of it a mask reaches, so any mask hides all.
            return result if not paths else None
        uri = None
        if request.method == "resources/read":
            uri = Entity.parse(request.target).id.partition("/")[2]
        masked, _ = mask_result(result, paths, uri)
        # Still large (`LargeMessage`): shown in turns (`bastion.approvals.pages`).
        return LargeMessage(masked) if result.__class__ is LargeMessage else masked

    def unmatched_fields(
        self, request: ApprovalRequest, person: str, withheld_fields: tuple[str, ...]
    ) -> str | None:
        """Why some of the fields ``person`` would withhold on releasing ``request``'s held
        result withhold nothing, naming each, or None when every one does. A path counts when
        it reaches the result as the reviewer may see it (`review_view`; `masks.reaches`), in
        any of the JSON values a mask reaches into (`masks.json_values`): a mistyped key is
        refused, while a key whose list is empty here is taken (nothing there to withhold).
        Matched against the reviewer's view, not the held result, so that which paths are
        refused tells nothing of what the policy masks for them."""
        from bastion.gateway.masks import json_values, reaches

        values = json_values(self.review_view(request, person))
        problems = []
        for path in dict.fromkeys(withheld_fields):
            keys = path_keys(path)
            if keys is None:
                problems.append(
                    f"the withheld field {path!r} cannot be read as a path (keys separated by"
                    " dots, * for every element or key: customers.*.email)"
                )
            elif not any(reaches(value, keys) for value in values):
                problems.append(
                    f"the withheld field {path!r} matches nothing in the held result as you"
                    " may see it (check its spelling against the result shown)"
                )
        if not problems:
            return None
        return "; ".join(problems) + "; nothing was released"

    # -- the policy's side ---------------------------------------------------------------------

    def answerers(self, call: Call, context: dict[str, Any]) -> tuple[Terms, str | None]:
        """Who may answer ``call`` if it is held now: the policy's terms, and the person who
        confirms it where no approver rule names anyone (`confirmer`). `NoApprover` when
        nobody could, as `_entitled` would take answers (`_nobody`): no approver named but those
        forbidden to answer their own call, no confirmer who may, or only disabled or suspended
        ones, or fewer than the approvals it needs, and no approver rule open to people the
        facts do not name; or rules over the evaluation budget (the narrowest terms). The
        enforcement point refuses such a call before it holds it, or, for a result to review,
        before the call runs."""
        with self.authorizer().session(context) as s:
            terms = self._terms_in(s, call.subject, call.action, call.resource, call.chain)
        if terms.over_budget is not None:
            raise NoApprover.over_budget(terms.over_budget)
        if terms.undecided is not None:
            raise NoApprover.undecided(terms.undecided)
        confirmer = self.confirmer(call.subject, call.chain)
        nobody = self._nobody(call, context, terms, confirmer)
        if nobody is not None:
            raise nobody
        return terms, confirmer

    def stranded(self, request: ApprovalRequest) -> NoApprover | None:
        """Why nobody may answer the pending ``request`` any more, or None: `answerers`' rule,
        asked now of the call it holds (its context as `_call_context` keeps it), under the
        terms an answer would be taken under (`_read`: the policy's now, forbidding
        self-approval if either reading did), with the person who confirms it only if the
        request's own confirmer still does (`_entitled`), and the more approvals of the two
        readings (`_read`). Approvers disabled or suspended since count for nobody, as when a
        call is held (`_nobody`): enabled or resumed, they answer the call sent again."""
        context = _call_context(request, self.clock())
        call = Call(
            request.kind,
            request.subject,
            request.client_id,
            request.server,
            request.method,
            request.action,
            Entity.parse(request.target),
            request.arguments,
            request.arguments_digest,
            request.agents,
        )
        with self.authorizer().session(context) as s:
            now = self._terms_in(s, call.subject, call.action, call.resource, call.chain)
        if now.over_budget is not None:
            return NoApprover.over_budget(now.over_budget)
        if now.undecided is not None:
            return NoApprover.undecided(now.undecided)
        terms = replace(
            now,
            required=max(now.required, request.required),
            self_forbidden=now.self_forbidden or request.self_forbidden,
        )
        confirmer = self.confirmer(request.subject, request.chain)
        replaced = confirmer != request.confirmer  # neither confirms it (`_entitled`)
        try:
            nobody = self._nobody(call, context, terms, None if replaced else confirmer)
            if (
                nobody is not None
                and replaced
                and confirmer is not None
                and self._nobody(call, context, terms, confirmer) is None
            ):
                return NoApprover.owner_replaced(request.subject)
            return nobody
        except NoApprover as over_budget:  # the open approver rule spent the budget
            return over_budget

    def _nobody(
        self, call: Call, context: dict[str, Any], terms: Terms, confirmer: str | None
    ) -> NoApprover | None:
        """Why nobody could answer ``call`` under ``terms`` with ``confirmer`` confirming it
        where no approver is named, or None (`answerers`): fewer people who may answer it, as
        `_entitled` takes answers, and who answer at all (`_standing`: not disabled, not
        suspended), than the approvals it needs. Each who approved already and still may
        counts as one (`_standing_approvals`). An approver rule open to people the facts do
        not name (`_open_to_anyone`) is not counted: someone may always answer it."""
        own = (call.subject, confirmer)  # forbidden to answer under self_approval_forbidden
        if terms.approvers:
            people = [a for a in terms.approvers if a not in own or not terms.self_forbidden]
        else:
            people = [confirmer] if confirmer is not None and not terms.self_forbidden else []
        able, states = 0, set()
        for person in people:
            state = self._standing(person)
            if state is not None:
                states.add(state)
            elif (able := able + 1) >= terms.required:
                return None
        if self._open_to_anyone(call, context):
            return None
        if able == 0 and states:
            return NoApprover.unable(states)
        if people:
            return NoApprover.too_few(terms.required, able, states)
        if terms.self_forbidden and confirmer is not None:
            return NoApprover.self_forbidden(call, confirmer)
        return NoApprover.nobody_behind(call.subject)

    def _open_to_anyone(self, call: Call, context: dict[str, Any]) -> bool:
        """Whether the approver rules let a person answer ``call`` whom no fact names (and so
        whom they cannot list): ``approver(other, user, ...) if other != user``. Asked of a
        name no user can have; such a rule lets any other person answer (`_entitled`)."""
        nobody = Entity("User", "\x00 anyone the policy does not list")
        user = Entity("User", call.subject)
        try:
            with self.authorizer().session(context) as s:
                return bool(s.rows("approver", "bbbb", nobody, user, call.action, call.resource))
        except EvaluationLimit as limit:
            raise NoApprover.over_budget(limit) from None

    def confirmer(self, subject: str, chain: tuple[str, ...]) -> str | None:
        """Who confirms a call of ``subject`` through the agents ``chain`` where no approver
        rule names anyone: the user, when a person stands behind the call; for an agent acting
        as itself (the subject is its own client id: client credentials, and what it
        delegates), the owner of that agent (`bastion.agents.identity`) if it has exactly one
        and that owner is a bastion user (`user_state`), as the kill switch counts the owner
        where no person is in a chain; else nobody (None). Never the client id taken as a
        person's name: no user is named like a client, but an approvals key or the CLI could
        vouch for that name."""
        if has_person(token_principals(subject, chain)):  # `Call.person`
            return subject
        owners = identity.owners(self.facts, subject)
        if len(owners) != 1 or owners[0] in chain or self.user_state(owners[0]) is None:
            return None  # several owners are facts written by hand: none is the one
        return owners[0]

    def _terms_in(
        self, s: Session, subject: str, action: str, resource: Entity, chain: tuple[str, ...]
    ) -> Terms:
        """Who may answer a held call and how, asked of the session ``s``. An approver the
        rules name who is one of the call's agents (``approver(user, user, ...)`` for an agent
        acting as itself) is no person: left out."""
        user = Entity("User", subject)
        seconds = self.settings.expiry_seconds
        try:
            approvers = sorted(
                a.id
                for a in s.rows("approver", "fbbb", user, action, resource)
                if isinstance(a, Entity) and a.type == "User" and a.id not in chain
            )
            # 2.5 approvals: 3; fewer than one asks no more than the default, one.
            asked = _numbers(s, "approvals_required", user, action, resource)
            required = max([1, *(math.ceil(min(n, MAX_REQUIRED)) for n in asked)])
            forbidden = bool(s.rows("self_approval_forbidden", "bbb", user, action, resource))
            windows = _windows(s, user, action, resource)
            shorter = _numbers(s, "approval_expires", user, action, resource)
            if any(n <= 0 for n in shorter):  # lapsed before it is made: nobody may answer
                raise s.undecided("approval_expires", 4, "gives no time (0 seconds or fewer)")
        except (EvaluationLimit, UndecidedQuestion) as refused:
            # Over budget, or a rule whose values cannot be named (`UndecidedQuestion`): nobody
            # but the user, once, and never by default for themself if forbidden — the
            # narrowest terms, not the widest (nobody may answer: a call is not held under
            # them, `answerers`).
            approvers, required, forbidden, windows, shorter = [], 1, True, [], []
            over_budget = refused if isinstance(refused, EvaluationLimit) else None
            undecided = refused.predicate if isinstance(refused, UndecidedQuestion) else None
        else:
            over_budget = undecided = None
        window = min(min(windows, default=0), self.settings.max_window_minutes)
        return Terms(
            approvers=tuple(approvers),
            required=min(required, MAX_REQUIRED),
            self_forbidden=forbidden,
            window_minutes=window,
            seconds=min([seconds, *shorter]),
            over_budget=over_budget,
            undecided=undecided,
        )

    def may_answer(self, request: ApprovalRequest, person: str) -> str | None:
        """None if ``person`` (a user's name) may answer ``request`` now; else why not. The one
        check of the API, the command line and the pages: a person bastion has disabled, or
        the kill switch holds, answers nothing, whatever the policy's approver rules say.
        What they show; `answer` asks it again, under the request's lock, and that decides."""
        return self._answerable(request, person)[0]

    def _answerable(
        self, request: ApprovalRequest, person: str
    ) -> tuple[str | None, _Reading | None]:
        """`may_answer`'s refusal, or None and the one reading of the policy the answer is
        taken under (`_read`: the terms, and who of ``person`` and those who approved already
        may answer under them)."""
        if not is_name(person):
            # Another spelling of a person (a blank letter after the name, a second space)
            # would count as one more approver, or pass for someone other than the user.
            return f"{readable(person)} cannot be a user's name: nobody answers in it", None
        if request.status != OPEN:
            return f"this request is {request.status}, not pending", None
        if _denied(request):
            return "this request was denied", None
        if request.expires_at <= self.clock():
            return "this request has expired", None
        standing = self.standing_refusal(person)
        if standing is not None:
            return standing, None
        if any(a.approver == person for a in request.answers):
            return f"{person} has already answered this request", None
        reading = self._read(request, (person, *(a.approver for a in request.approvals)))
        return reading.refusals[person], reading

    def _read(self, request: ApprovalRequest, people: tuple[str, ...]) -> _Reading:
        """The policy's say on answering ``request``, read once (one session: one view of the
        policy and facts), so that no answer is taken under terms read at one moment and an
        approver's right read at another. The terms are the policy's now (so an approver
        removed meanwhile answers nothing), never wider than those the call was held under. The
        facts they turn on may have changed either way while the call waited; a tool frozen
        since, or a user put on probation, narrows them (the shorter window, the more
        approvals), and nothing that happened since widens what the hold asked for."""
        resource = Entity.parse(request.target)
        confirmer = self.confirmer(request.subject, request.chain)
        with self.authorizer().session(_call_context(request, self.clock())) as s:
            now = self._terms_in(s, request.subject, request.action, resource, request.chain)
            terms = Terms(
                approvers=now.approvers,
                required=max(now.required, request.required),
                self_forbidden=now.self_forbidden or request.self_forbidden,
                window_minutes=min(now.window_minutes, request.window_minutes),
                seconds=now.seconds,
            )
            refusals = {p: self._entitled(s, request, p, terms, confirmer) for p in people}
        return _Reading(terms, refusals)

    def _entitled(
        self,
        s: Session,
        request: ApprovalRequest,
        person: str,
        terms: Terms,
        confirmer: str | None,
    ) -> str | None:
        """None if the policy (the session ``s``) lets ``person`` answer ``request`` under
        ``terms``; else why not. ``confirmer``: who confirms the call now where no approver is
        named (`confirmer`); the request's own, read when it was held, must be that person too
        (an owner replaced meanwhile confirms nothing, nor does the new one)."""
        if person in request.chain:  # with no person behind it, the subject is among them
            return (
                f"{person} is an agent of this call, not a person: nobody answers in an"
                " agent's name"
            )
        if person in (request.subject, request.confirmer):
            if terms.self_forbidden:
                return "the policy forbids approving one's own call here"
            if person in terms.approvers:
                return None
            if terms.approvers:
                return f"{person} may not approve their own call: the policy names its approvers"
            if person == request.confirmer == confirmer:
                return None
            return (
                f"{person} no longer confirms this call: the owner of agent"
                f" {request.subject!r} who confirms it is another now, or none"
            )
        if person in terms.approvers:
            return None
        resource = Entity.parse(request.target)
        user = Entity("User", request.subject)
        try:
            if s.rows("approver", "bbbb", Entity("User", person), user, request.action, resource):
                return None
        except EvaluationLimit:
            pass
        return f"{person} is not an approver of this request under the policy"

    def _standing_approvals(self, request: ApprovalRequest, reading: _Reading) -> int:
        """How many of ``request``'s approvals count when it is decided: those of people who may
        still approve it under ``reading``. One given by an approver the policy has removed
        since, or who is disabled or suspended since, gives none: it decides nothing, as an
        answer they gave now would not be taken."""
        return sum(
            1
            for a in request.approvals
            if reading.refusals.get(a.approver, "not read") is None
            and self.standing_refusal(a.approver) is None
        )

    def standing_refusal(self, person: str) -> str | None:
        """Why ``person`` answers nothing, and sees no more of a request than anyone, whatever
        the policy says (disabled, or held by the kill switch), or None."""
        state = self._standing(person)
        if state == "disabled":
            return f"{person} is disabled: a disabled user answers no request"
        if state == "suspended":
            return _SUSPENDED.format(person=person)
        return None

    def _standing(self, person: str) -> str | None:
        """Why ``person`` answers nothing whatever the policy says, "disabled" or "suspended";
        else None (a name that is no bastion user has no state to be disabled)."""
        if self.user_state(person) == "disabled":
            return "disabled"
        if (
            self.suspensions is not None
            and self.suspensions.first((Entity("User", person),)) is not None
        ):
            return "suspended"
        return None

    def answer(
        self,
        request_id: str,
        person: str,
        answer: str,
        *,
        minutes: int = 0,
        channel: str,
        reason: str = "",
        withheld_fields: tuple[str, ...] = (),
        via: str = "",
    ) -> ApprovalRequest:
        """Record ``person``'s answer ("approve" or "deny"; for a review, release or withhold)
        and resolve the request when it is decided. `NotAllowed` says why an answer is refused.
        ``via``: who vouched that the answer is ``person``'s (an API key, the CLI's OS user),
        kept in the audit event."""
        if answer not in ("approve", "deny"):
            raise NotAllowed(f"answer must be approve or deny, not {answer!r}")
        problem = answer_problem(reason, withheld_fields)
        if problem is not None:
            raise NotAllowed(problem)
        if minutes and (type(minutes) is not int or minutes < 0):
            raise NotAllowed("minutes must be a whole number of minutes")
        request = self._settled(self.store.get(request_id))
        if request is None:
            raise UnknownRequest(request_id)
        if request.kind == "review":
            if minutes:
                raise NotAllowed("a result is released once; it takes no minutes")
        elif withheld_fields:
            raise NotAllowed("fields are withheld from results under review, not from calls")
        kind = request.kind
        verb = _verbs(kind)[answer]
        # One transaction: the answer, the request's resolution, a grant for a time and their
        # audit events are written whole or not at all (a process killed between the answer
        # and the resolution left a denial that decided nothing). Everything that decides
        # whether the answer is taken and what it decides (the request's state and expiry, the
        # person's standing, the policy, once) is read under the request's lock: answers are
        # taken one at a time whichever process takes them (two approvals at once each see
        # the other's), and a change committed while this answer was checked, or waited for
        # the lock (an approver removed, disabled or suspended; the expiry passing), counts.
        # A suspension is read as stored, not as this replica's view holds it (which may not
        # have heard of it yet), under the kill switch's lock, taken first (as a suspension's
        # write takes it before its rows): a suspension written meanwhile waits for the answer,
        # and takes back what it approved.
        with self.store.db.transaction():
            lock_suspensions(self.store.db, shared=True)
            request = self.store.locked(request.id)
            assert request is not None
            why, reading = self._answerable(request, person)
            if why is None and stored_hold(self.facts, (Entity("User", person),)) is not None:
                why = _SUSPENDED.format(person=person)
            if why is not None:
                raise NotAllowed(why)
            assert reading is not None
            terms = reading.terms
            if minutes > terms.window_minutes:
                raise NotAllowed(
                    f"the policy allows approvals of this call for {terms.window_minutes}"
                    " minutes at most"
                    if terms.window_minutes
                    else "the policy allows this call to be approved once only, not for a time"
                )
            if minutes:
                self._check_grant(request)
            if withheld_fields and answer == "approve":
                unmatched = self.unmatched_fields(request, person, withheld_fields)
                if unmatched is not None:
                    raise UnmatchedField(unmatched)
            now = self.clock()
            given = Answer(person, answer, minutes, channel, reason, now, withheld_fields)
            try:
                self.store.answer(request.id, given)
            except ValueError as e:
                raise NotAllowed(str(e)) from None
            self._event(
                request,
                f"{kind}.answer",
                approver=person,
                answer=verb,
                channel=channel,
                reason=reason,
                minutes=minutes,
                withheld_fields=list(withheld_fields),
                **({"via": via} if via else {}),
            )
            request = self.store.get(request.id)
            assert request is not None
            if answer == "deny":
                self.store.resolve(request.id, verb, from_status=OPEN)
            elif self._standing_approvals(request, reading) >= terms.required:
                # Every field any reviewer withheld: a later release never gives back what an
                # earlier reviewer held back (before, only the deciding answer's were kept).
                withheld = {p for a in request.approvals for p in a.withheld_fields}
                self.store.resolve(
                    request.id, verb, from_status=OPEN, withheld_fields=tuple(sorted(withheld))
                )
                window = min(a.minutes for a in request.approvals)
                if kind == "approval" and window > 0:
                    self._grant(request, window)
            request = self.store.get(request.id)
            assert request is not None
            if request.status != OPEN:
                self._event(request, f"{kind}.{request.status}")
        return request

    def _settled(self, request: ApprovalRequest | None) -> ApprovalRequest | None:
        """``request``, resolved as denied (withheld, for a review) if it is pending with a
        denial stored: what a version that wrote a denial and the resolution apart left when
        it was stopped between the two. One denial decides, so it is settled as it would have
        been, with its audit event, wherever such a request is read."""
        if request is None or request.status != OPEN or not _denied(request):
            return request
        status = _verbs(request.kind)["deny"]
        with self.store.db.transaction():
            if self.store.resolve(request.id, status, from_status=OPEN):
                self._event(request, f"{request.kind}.{status}", reason="a denial was stored")
            settled = self.store.get(request.id)
        return settled

    def get(self, request_id: str, *, look: bool = True) -> ApprovalRequest | None:
        """The request ``request_id``, or None. ``look``: a person looks at it (the page, the
        API, the CLI), so a pending request nobody may answer any more is closed first
        (`_close_if_stranded`); the gateway's wait polls without, and asks `stranded` itself."""
        request = self._settled(self.store.get(request_id))
        return self._looked_at(request) if look else request

    def listed(
        self, *, status: str | None = None, approver: str | None = None, limit: int = 100
    ) -> list[ApprovalRequest]:
        """Requests, newest first; those pending that nobody may answer any more are closed
        first (`_close_if_stranded`), so a listing of what is pending leaves them out."""
        found = self.store.listed(status=status, approver=approver, limit=limit)
        settled = [self._looked_at(self._settled(r)) for r in found]
        return [r for r in settled if r is not None and status in (None, r.status)]

    def _looked_at(self, request: ApprovalRequest | None) -> ApprovalRequest | None:
        """``request`` as a person is shown it: closed if nobody may answer it any more. Where
        the policy cannot be read here now (`Unavailable`), shown as it is: showing it pending
        grants nothing, and the call's retry is refused all the same."""
        try:
            return self._close_if_stranded(request)[0]
        except Unavailable:
            return request

    def _close_if_stranded(
        self, request: ApprovalRequest | None
    ) -> tuple[ApprovalRequest | None, NoApprover | None]:
        """``request``, closed (``expired``, and its audit event with the ``reason``) if it is
        pending and nobody may answer it now (`stranded`), and why; else as it is, and None.
        Answered meanwhile, it is as it was answered (the answer decides)."""
        if request is None or request.status != OPEN or request.expires_at <= self.clock():
            return request, None
        nobody = self.stranded(request)
        if nobody is None:
            return request, None
        with self.store.db.transaction():
            closed = self.store.resolve(request.id, "expired", from_status=OPEN)
            if closed:
                self._event(
                    request, f"{request.kind}.expired", reason=nobody.reason, why=str(nobody)
                )
            after = self.store.get(request.id)
        return after, nobody if closed else None

    # -- time-bounded grants -------------------------------------------------------------------

    def _grant_fact(self, request: ApprovalRequest) -> tuple:
        return (
            GRANT,
            Entity("User", request.subject),
            approval_grant_agent(request.chain, request.task),
            request.action,
            Entity.parse(request.target),
        )

    def _check_grant(self, request: ApprovalRequest) -> None:
        fact = self._grant_fact(request)
        try:
            self.authorizer().facts.validate(fact)
        except FactError as e:
            raise NotAllowed(
                f"an approval for a time is stored as an {GRANT} fact, and the policy cannot"
                f" hold it: {e}"
            ) from None
        try:  # before the answer is written: the grant would fail after it (a 500, no grant)
            check_storable(fact)
        except FactError as e:
            raise NotAllowed(
                f"an approval for a time is stored as an {GRANT} fact, and the store cannot"
                f" hold this one: {e}; approve it once instead"
            ) from None

    def _grant(self, request: ApprovalRequest, minutes: int) -> None:
        expires = self.clock() + minutes * 60
        fact = self._grant_fact(request)
        self.facts.apply([StoredFact(fact, expires)], actor=f"approval {request.id}")
        self._event(request, "approval.grant", minutes=minutes, expires_at=expires)

    # -- the record ----------------------------------------------------------------------------

    def _event(self, request: ApprovalRequest, kind: str, **detail: Any) -> None:
        self.audit.record(
            kind,
            subject=request.subject,
            client_id=request.client_id,
            **({"agents": list(request.agents)} if request.agents else {}),
            **({"task": request.task} if request.task else {}),
            request_id=request.id,
            server=request.server,
            method=request.method,
            target=request.target,
            decision_id=detail.pop("decision_id", request.decision_id),
            **detail,
        )


def _verbs(kind: str) -> dict[str, str]:
    """What an answer makes of a request of ``kind``: its status, and its audit events' word."""
    if kind == "review":
        return {"approve": "released", "deny": "withheld"}
    return {"approve": "approved", "deny": "denied"}


def _denied(request: ApprovalRequest) -> bool:
    """Whether anyone denied ``request``: one denial decides it."""
    return any(a.answer == "deny" for a in request.answers)


def _windows(s: Session, user: Entity, action: str, resource: Entity) -> list[int]:
    """The minutes of the ``approval_window`` rules whose shortest is the window (none: no
    window). A window widens what an approval allows, so whether there is one at all is read
    as an ``allow`` rule is: a rule whose condition cannot be decided gives none. How long it
    is narrows, so it is read as an obligation that restricts is (strict, `STRICT_TOO`): such
    a rule for fewer minutes counts, and so do minutes that are no whole number (``8.5``: 8;
    ``"5"``, ``true``: none, this call only), never dropped, which would leave a longer window.
    `UndecidedQuestion` where another rule gives a window and those minutes cannot be named at
    all."""
    given = s.rows("approval_window", "bbbf", user, action, resource, strict=False)
    if not any(type(n) is int and n > 0 for n in given):
        return []
    found = s.rows("approval_window", "bbbf", user, action, resource, strict=True)
    # An infinite one is as long as any (`max_window_minutes` bounds them all).
    return [math.floor(min(max(n, 0), MAX_WINDOW_MINUTES)) if _is_number(n) else 0 for n in found]


def _is_number(value: Any) -> bool:
    """An int or a float that is a number (not NaN); not a bool."""
    return type(value) is int or (type(value) is float and value == value)


def _numbers(s: Session, predicate: str, user: Entity, action: str, resource: Entity) -> list:
    """The numbers the ``predicate(user, action, resource, n)`` rules give (``approvals_required``
    or ``approval_expires``), read as strict code (`STRICT`). Each narrows the terms, so a
    value that is no number (``"3"``, ``true``, NaN) is no value to drop, which would widen
    them (one approval instead of three, the default expiry): `UndecidedQuestion`, the
    narrowest terms, as for a value that cannot be named."""
    found = s.rows(predicate, "bbbf", user, action, resource)
    for n in found:
        if not _is_number(n):
            raise s.undecided(
                predicate,
                4,
                f"gives {readable(repr(n), 60)}, which is no number: a value that narrows how"
                " the call is approved is refused rather than dropped",
            )
    return list(found)


def _call_context(request: ApprovalRequest, now: float) -> dict[str, Any]:
    """The ``context`` a policy sees when it is asked about a held call away from the call
    (who may answer, what a reviewer may see): its server, method, arguments and what the
    gateway names the target by (tool, uri or prompt), at the time of asking. What else the
    call's own context held (scopes, client address, signals) is not kept with the request."""
    context: dict[str, Any] = {
        "time": _now(now),
        "server": request.server,
        "method": request.method,
        "arguments": request.arguments,
    }
    target = Entity.parse(request.target)
    key = {"Tool": "tool", "McpResource": "uri", "Prompt": "prompt"}.get(target.type)
    if key is not None and "/" in target.id:
        context[key] = target.id.partition("/")[2]
    return context


def _now(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def approvals_from_config(
    database: str,
    settings: ApprovalSettings,
    key_dir: str,
    issuer: str,
    authorizer: Callable[[], Authorizer],
    policy_version: Callable[[], int | None],
    current: Callable[[], Awaitable[None]] = _current,
    suspensions: Suspensions | None = None,
) -> Approvals:
    """The approvals of a server with a gateway: its own database connection, the ``[approvals]``
    table's settings, and two secrets of the deployment in ``key_dir`` (one seals what requests hold, one
    keys the digests that bind a request to its call); the users' states are read on that
    connection, the suspensions from ``suspensions`` (the replica's view, or the command's)."""
    from bastion.db import Database
    from bastion.oauth.keys import deployment_secret
    from bastion.oauth.store import OAuthStore
    from bastion.server.config import ConfigError

    try:
        sealing = deployment_secret(key_dir, SEALING_KEY)
        binding = deployment_secret(key_dir, BINDING_KEY)
    except (OSError, ValueError) as e:
        raise ConfigError(f"oauth.key_dir: {e}") from None
    db = Database(database, role="bastion-approvals")
    approvals = Approvals(
        ApprovalStore(db, sealing),
        FactStore(db),
        authorizer,
        policy_version,
        settings,
        issuer,
        binding,
        AuditLog(db),
        current=current,
        user_state=OAuthStore(db).user_state,
        suspensions=suspensions,
    )
    if settings.webhooks:
        from bastion.approvals.webhooks import WebhookNotifier

        approvals.webhooks = WebhookNotifier(settings, db, approvals.url)
        approvals.on_new_request.append(approvals.webhooks.notify)
    return approvals


SEALING_KEY = "approvals-sealing.key"
BINDING_KEY = "approvals-binding.key"
