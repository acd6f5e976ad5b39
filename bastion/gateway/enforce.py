"""The enforcement point's decision step: context, the PDP's answer, obligations, the record.

Every message the gateway decides goes through `Enforcer.decide`: it builds the ``context`` the
policy sees, asks `decide_chain` (every principal must be allowed), turns the answer into a
`Verdict`, and buffers a decision record. The gateway never reads policy text: it only asks.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, NoReturn

import anyio

from bastion.approvals.service import Approvals, Call, NoApprover, Outcome
from bastion.approvals.store import ApprovalRequest
from bastion.audit.decisions import (
    DecisionRecord,
    DecisionRecords,
    canonical_bytes,
    new_decision_id,
)
from bastion.db import DatabaseUnavailable, first_line
from bastion.decide import Authorizer
from bastion.decide.contract import (
    ChainDecision,
    Obligations,
    decide_chain,
    explained_principal,
    policy_result,
    remembered_calls,
    required_scopes,
    same_value,
)
from bastion.delegation.labels import (
    CONTEXT_FIELD,
    LabelKey,
    LabelsFull,
    LabelsUnavailable,
    LocalLabels,
    RedisLabels,
    SessionView,
)
from bastion.facts.model import Entity
from bastion.gateway.jsonrpc import (
    FACTS_STALE,
    RATE_LIMIT_UNAVAILABLE,
    RATE_LIMITED,
    REFUSED_BY_POLICY,
    RpcError,
)
from bastion.gateway.ratelimit import LimitsUnavailable, RateLimiter, RedisRateLimiter
from bastion.gateway.tool_pins import PinChange
from bastion.policy.errors import EvaluationLimit, UndecidedQuestion
from bastion.policy.runtime import context_value
from bastion.retries import Outage, kind_of
from bastion.signals.behavior import (
    COUNTED_METHODS,
    BehaviorUnavailable,
    BehaviorView,
    LocalBehavior,
    RedisBehavior,
)
from bastion.signals.posture import RequestPosture
from bastion.signals.read_only import MEANING as READ_ONLY_MEANING
from bastion.signals.read_only import read_only_holds
from bastion.signals.shadow import Shadow
from bastion.signals.step_up import ERROR as SIGN_IN_AGAIN
from bastion.signals.suspensions import Suspensions, has_person, token_principals

log = logging.getLogger("bastion.gateway")

# How long a call cancelled before it was sent waits for its approval to be given back; the
# write goes on after, in a task of its own (`Enforcer.run_cancelled`).
GIVE_BACK_WAIT_SECONDS = 5.0
# Those writes still under way (a task the loop holds only weakly could be collected midway).
_giving_back: set[asyncio.Task] = set()


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sends a message: the verified token's user and agent, and where from."""

    subject: str
    client_id: str
    scopes: frozenset[str]
    address: str
    protocol_version: str
    grant_id: str = ""  # the grant its token belongs to: revoking it ends the caller's streams
    session_id: str = ""  # the Mcp-Session-Id it came with (2025-11-25), for the kill switch
    auth_time: int | None = None  # when the person signed in for the token (its auth_time)
    # Network zone, device and token age (bastion.signals.posture), merged into the context.
    posture: RequestPosture | None = None
    # A delegated token's agents, from the first one the user let act to the one calling now
    # (``client_id``); empty for a token the user granted to ``client_id`` directly.
    agents: tuple[str, ...] = ()
    task: str = ""  # the task the token is bound to, if any
    # The task whose label set it reads and records where not ``task`` (a ``labels_task`` claim).
    labels_task: str | None = None
    # Every agent of the chain, from the first to the calling one (``client_id`` alone for a
    # direct grant): with ``subject``, whom per-caller state (sessions, upstream sessions, held
    # requests) belongs to, so that a sub-agent's work for one chain is never another chain's.
    chain: tuple[str, ...] = field(init=False)
    # The user and every agent of the chain, as the policy sees them (every one must be allowed).
    principals: tuple[Entity, ...] = field(init=False)
    # Whether a person is among them (`has_person`): worked out once, as a caller is made once
    # per token and request shape, and asked on every call (`_behavior_alerts`).
    person: bool = field(init=False)

    def __post_init__(self) -> None:
        chain = self.agents or (self.client_id,)
        object.__setattr__(self, "chain", chain)
        principals = token_principals(self.subject, chain)
        object.__setattr__(self, "principals", principals)
        object.__setattr__(self, "person", has_person(principals))


@dataclass(slots=True, eq=False)  # an exception: see `bastion.gateway.jsonrpc.RpcError`
class StepUp(Exception):
    """The token lacks scopes the policy requires: answer 403 ``insufficient_scope``; or, with
    ``max_age``, its sign-in is older than the policy accepts: answer 401
    ``insufficient_user_authentication`` (RFC 9470)."""

    scopes: tuple[str, ...]
    decision_id: str
    max_age: int | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    """An allowed message and what must be done to it."""

    decision_id: str
    obligations: Obligations
    record: dict[str, Any] = field(default_factory=dict)
    # requires_review: "hold" (forward, then hold the result for a reviewer) or "release" (a
    # reviewer released the result of this very call: ``review`` is its request).
    review_step: str | None = None
    review: ApprovalRequest | None = None
    # The call, as bound to requests (for holding its result).
    call: Call | None = None
    # The approval this call's run spent, marked in progress until `Enforcer.run_ended`.
    spent: ApprovalRequest | None = None


@dataclass(frozen=True, slots=True)
class Obligated:
    """What an allowed message's approval, review and rate limits make of it
    (`Enforcer._obligations`)."""

    # The decision: decided again, with the approval in the context, when one was given.
    chain: ChainDecision
    result: str
    reason: str = ""
    retry_after: float | None = None  # for a message its rate limits refuse
    held: tuple[Call, Outcome] | None = None  # the hold to place
    review: tuple[Call, Outcome] | None = None  # the review the message is under
    linked: ApprovalRequest | None = None  # the approval request the message is linked to
    # The approval it spent (marked in progress for the run), where it is allowed.
    spent: ApprovalRequest | None = None
    # Why nobody could review its result, where nobody could (or answer its pending request any
    # more: `Approvals.check` closed it).
    nobody: NoApprover | None = None
    # Whether its rate limits' counters were asked and it stays counted (none are for a message
    # held or refused before them; one refused after them is given back).
    counted: bool = False
    # The approval the run whose result is under review used, where ``linked`` is that review.
    approved: ApprovalRequest | None = None


@dataclass(slots=True, eq=False)  # an exception: see `bastion.gateway.jsonrpc.RpcError`
class Held(Exception):
    """The call, or its result, waits for people: the request the client is pointed at."""

    request: ApprovalRequest
    decision_id: str
    url: str
    retry_after: float
    reason: str  # approval_pending, approval_in_progress or review_pending
    target: str  # the resource, as refusals name it: desk/send_email


class ArgumentDigest:
    """The digest of a message's arguments in its decision record: HMAC-SHA256 under a key of
    the deployment, so that a reader of the records cannot confirm a guess of small values (an
    id, an address) by hashing it, and the same arguments still match across records, restarts
    and replicas that share the key. Computed by the standard library's `hmac`, from a copy of
    one keyed state made once: the one-shot `hmac.digest` looks the algorithm up in OpenSSL on
    each call, which in the gateway cost more (docs/benchmarks.md, the fifth session)."""

    def __init__(self, key: bytes) -> None:
        keyed = hmac.new(key, digestmod="sha256")
        # Where OpenSSL has SHA-256 (always, in practice), `hmac.HMAC` holds OpenSSL's HMAC
        # state as ``_hmac`` and hands each copy, update and hexdigest to it through Python of
        # its own: that state is used at once, the same calls without the wrapper around each.
        self._keyed = getattr(keyed, "_hmac", None) or keyed

    def __call__(self, arguments: Any) -> str:
        if arguments is None:
            return ""
        mac = self._keyed.copy()
        mac.update(canonical_bytes(arguments))
        return "hmac-sha256:" + mac.hexdigest()


# What a refusal's reason means, where its name alone would leave the agent guessing.
_MEANINGS = {
    "read_only": READ_ONLY_MEANING,
    "tool_changed": "this tool's definition changed since it was accepted; it is refused until"
    " an operator accepts the new one (bastion tools show)",
    "tool_not_reviewed": "this tool is new and is refused until an operator accepts it"
    " (bastion tools show)",
    "tool_not_listed": "the upstream does not list this tool now",
    "prompt_changed": "this prompt's definition changed since it was accepted; it is refused"
    " until an operator accepts the new one (bastion prompts show)",
    "prompt_not_reviewed": "this prompt is new and is refused until an operator accepts it"
    " (bastion prompts show)",
    "prompt_not_listed": "the upstream does not list this prompt now",
    # Of a message nobody waits on (`Enforcer.decide` ``holds``): an upstream's request to a
    # client, which the upstream waits for.
    "requires_approval": "the policy holds this request for a person's approval, which cannot"
    " be waited for here",
    "review_required": "the policy holds this request for a person's review, which cannot be"
    " waited for while the upstream waits for its answer",
}


def refused(
    target: str, decision_id: str, reason: str, meaning: str | None = None, **extra: Any
) -> RpcError:
    """The error an agent sees: refused, and the decision id to quote; no policy internals.
    ``meaning``: what the reason means here, where the reason alone does not say (a hold
    nobody could answer: `NoApprover.meaning`)."""
    meaning = meaning or _MEANINGS.get(reason) or reason.replace("_", " ")
    return RpcError(
        REFUSED_BY_POLICY,
        f"bastion refused this request ({target}): {meaning}",
        {"decision_id": decision_id, "reason": reason, **extra},
    )


def stale(resource: Entity, decision_id: str) -> RpcError:
    """The error of a message refused because this process cannot confirm its facts current."""
    return RpcError(
        FACTS_STALE,
        f"bastion refused this request ({resource.id}): its facts may be out of date (the"
        " decision service cannot reach its database); try again later",
        {"decision_id": decision_id, "reason": "facts_stale"},
    )


class Enforcer:
    def __init__(
        self,
        authorizer: Callable[[], Authorizer],
        records: DecisionRecords | None,
        limiter: RateLimiter | RedisRateLimiter | None = None,
        clock: Callable[[], float] = time.time,
        digest_key: bytes | None = None,
        facts_stale: Callable[[], bool] = lambda: False,
        facts_heard: Callable[[], Awaitable[bool] | None] = lambda: None,
        facts_in_force: Callable[[], Awaitable[None] | None] = lambda: None,
        position: Callable[[], tuple[int | None, int | None]] = lambda: (None, None),
        approvals: Approvals | None = None,
        suspensions: Suspensions | None = None,
        behavior: LocalBehavior | RedisBehavior | None = None,
        labels: LocalLabels | RedisLabels | None = None,
    ) -> None:
        self.authorizer = authorizer
        # Session labels (context.session.labels, `bastion.delegation.labels`).
        self.labels = labels or LocalLabels()
        # The kill switch (`bastion.signals.suspensions`): a suspended caller is refused first.
        self.suspensions = suspensions
        # Behaviour counters (context.behavior) and shadow rules (signals/).
        self.behavior = behavior or LocalBehavior()
        self.shadow = Shadow()
        # Holds for people; None: a call that needs one is refused (fail closed).
        self.approvals = approvals
        self.records = records
        self.limiter = limiter or RateLimiter()
        self.clock = clock
        # True while this process's facts are too old to decide on (the replica cannot follow
        # the database): every decision is refused, fail closed.
        self.facts_stale = facts_stale
        # None while every fact change this process has heard of is applied; else an awaitable
        # of whether it is soon enough (`Replica.heard_not_applied`): if not, refused as stale.
        self.facts_heard = facts_heard
        # None unless a fact change is being put in force; else an awaitable of when it is
        # (`Replica.in_force`): see `settled`.
        self.facts_in_force = facts_in_force
        # The policy version in force and the change-log sequence applied (`Replica`), named in
        # each decision record; (None, None) without a replica.
        self.position = position
        self.explained = Explained()
        # The message's own decision, from memory while it cannot have changed (`Remembered`).
        self.decisions = remembered_calls()
        # What the records say of the last decision, whatever the message (`Spelled`).
        self._spelled: Spelled | None = None
        # Alerts the decisions raise (`bastion.signals.alerts.Alerts`); None: none are raised.
        self.alerts: Any = None
        # server -> (the generation of policy and facts, the scopes it requires to connect).
        self._connect_scopes: dict[str, tuple[int, tuple[str, ...]]] = {}
        # Without a key of the deployment's, one of this process (digests match within it).
        self.digest = ArgumentDigest(digest_key or secrets.token_bytes(32))

    def context(self, caller: Caller, server: str, method: str, **extra: Any) -> dict[str, Any]:
        now = self.clock()
        context = {
            "server": server,
            "method": method,
            "scopes": sorted(caller.scopes),
            "client": {"ip": caller.address, "id": caller.client_id},
            "time": datetime.fromtimestamp(now, UTC),
            **(caller.posture.context(now) if caller.posture is not None else {}),
            **extra,
        }
        # Only for a policy that reads them: the others pay nothing (no Redis round trip).
        if self.authorizer().reads_context(CONTEXT_FIELD):
            context[CONTEXT_FIELD] = self.labels.view(label_key(caller))
        return context

    def connect_scopes(self, server: str) -> tuple[str, ...]:
        """The scopes the policy asks of every message to ``server`` (``requires_scope`` on
        ``connect``), as far as they can be told before any request: asked in a context that
        names the server only, so a rule that reads more of the request (its time, its client)
        adds nothing here, and the connect decision still asks it of each message. For the
        401's ``scope``, which a client asks for first (MCP authorization, Scope Selection
        Strategy): anything on the unauthenticated path is bounded, so the answer is kept per
        generation of policy and facts (the same generation, the same answer)."""
        authz = self.authorizer()
        generation = authz.settled_generation()
        known = self._connect_scopes.get(server)
        if known is not None and generation is not None and known[0] == generation:
            return known[1]
        try:
            with authz.session({"server": server}) as s:
                scopes = required_scopes(s, "connect", Entity("McpServer", server))
        except (EvaluationLimit, UndecidedQuestion):
            scopes = ()  # the connect decision refuses, naming why; the challenge asks nothing
        if generation is not None:
            self._connect_scopes[server] = (generation, scopes)
        return scopes

    async def scopes_after(
        self,
        caller: Caller,
        granted: tuple[str, ...],
        method: str,
        action: str,
        resource: Entity,
        context: dict[str, Any],
    ) -> tuple[str, ...]:
        """The scopes a message's own decision (``action`` on ``resource``) would still ask of
        the caller's token with ``granted`` added, where it would allow the message with them;
        none where it would refuse it anyway. For a message refused at ``connect`` to step up,
        whose challenge then names these too (`Gateway.admit`). Asked on that refusal's path
        only: nothing is allowed, counted or recorded by it, and what it cannot tell (an
        evaluation that spent its budget, a counter that cannot be read) names nothing."""
        try:
            if method in COUNTED_METHODS:
                context = await self._behavior_context(caller, repr(resource), context)
            chain = decide_chain(
                self.authorizer(),
                caller.principals,
                action,
                resource,
                context,
                granted_scopes=(*caller.scopes, *granted),
                task=caller.task,
            )
        except Exception:
            # The step-up it was asked for stands, naming what ``connect`` asks.
            log.exception("the scopes of %s on %s could not be told", action, resource)
            return ()
        return chain.missing_scopes

    def suspended(self, caller: Caller) -> Entity | None:
        """The caller's suspended agent, user or session, if any."""
        if self.suspensions is None:
            return None
        return self.suspensions.first(caller.principals, caller.session_id)

    async def may_decide(self) -> bool:
        """Whether this replica may decide now: its facts not stale (`facts_stale`: behind the
        database, a policy it cannot load, a newer schema, or its clock further than
        ``max_clock_skew_seconds`` from the database's) and every fact change it has heard of
        applied in time, as `decide` asks first. Asked before anything a refusal would waste
        is spent (a DPoP proof's jti): a replica that decides nothing spends nothing, so the
        client's retry of the same request on another replica goes through."""
        return not self.facts_stale() and ((heard := self.facts_heard()) is None or await heard)

    async def settled(self) -> None:
        """Return once no fact change is being put in force. Before a decision taken after the
        message waited for something else (its upstream's answer, say): a change that began
        meanwhile holds the fact lock, which the decision would wait for on the event loop."""
        if (changing := self.facts_in_force()) is not None:
            await changing

    def session_suspended(self, session_id: str) -> bool:
        return self.suspensions is not None and self.suspensions.first((), session_id) is not None

    def read_only(self, caller: Caller, context: dict[str, Any]) -> bool:
        """Whether the caller is downgraded to read-only on ``context.server`` (for lists);
        True when that cannot be evaluated within budget (fail closed)."""
        try:
            with self.authorizer().session(context) as s:
                return read_only_holds(s, caller.principals, context)
        except EvaluationLimit:
            return True

    def visible(
        self, caller: Caller, resources: list[Entity], context: dict[str, Any]
    ) -> list[bool]:
        """For a list page: may every principal ``list`` each resource? The page spends one
        evaluation budget, as one decision does (not one per item: a page of a thousand would
        hold the event loop for a thousand budgets); what is left once it is spent is not shown
        (fail closed)."""
        principals = caller.principals
        shown: list[bool] = []
        try:
            with self.authorizer().session(context) as s:
                for r in resources:
                    shown.append(all(s.allowed(p, "list", r) for p in principals))
        except EvaluationLimit:
            shown += [False] * (len(resources) - len(shown))
        return shown

    async def decide(
        self,
        caller: Caller,
        server: str,
        method: str,
        action: str,
        resource: Entity,
        context: dict[str, Any],
        arguments: Any = None,
        retried: str | None = None,
        annotations_now: Callable[[], Awaitable[dict[str, Any]]] | None = None,
        unpinned: PinChange | None = None,
        runs_for: float = 0.0,
        from_client: bool = True,
        holds: bool = True,
    ) -> Verdict:
        """Allow (with obligations), or raise `StepUp`, `Held` or the `RpcError` to send back.

        ``retried``: the approval request a client says it retries (a 2026-07-28 client's
        ``requestState``, or the hold answered while it waited: the call's approval or the
        review of its result); the call must be the one it was made for.

        ``annotations_now``: for a tool call, the tool's annotations as its upstream gives them
        now, asked only when the caller is downgraded to read-only (`_read_now`).

        ``unpinned``: the tool called (the prompt got) is not listed as accepted (``pin_tools``,
        ``pin_prompts``): refused before the policy is asked, after the kill switch.

        ``runs_for``: the longest the message's run upstream may take, for a message that is
        forwarded once decided: an approval it spends marks the run in progress that long, or
        until `run_ended` (`Verdict.spent`). 0: nothing is marked (``connect``).

        ``from_client``: the message is one its client sent, counted under its rate limits.
        False for what bastion sends a client unasked (a stream's notification, the
        ``connect`` an upstream's request on it reaches the client under: `Gateway.may_hear`),
        decided again but never counted (else whoever makes an upstream speak would spend a
        listener's limits, and have its own messages refused); its record lists the rate limits
        apart (`_record`). Such a message is never held either (``holds``).

        ``holds``: the message can wait for people. False for one nobody waits on (what bastion
        sends a client unasked; an upstream's request to a client, which the upstream waits
        for: `ClientRequests.decide`): the approval store is neither read nor written for it.
        An approval it needs and no approval for minutes covers refuses it
        (``requires_approval``), with no request filed and no approval spent (else a person
        would be asked to approve what can never run: approved, it would let through a later
        message nobody saw); a review refuses it (``review_required``), but on ``connect``,
        which has no result to hold (its record: allowed, no approval)."""
        started = time.perf_counter()
        decision_id = new_decision_id()
        holds = holds and from_client
        # Refusals made before the policy is asked: recorded, with what they noted. The kill
        # switch's refusal of a hold is recorded so too, noting what it was given (`given`).
        asked = (decision_id, caller, server, method, action, resource, arguments)
        given = context
        if self.facts_stale() or ((heard := self.facts_heard()) is not None and not await heard):
            why = stale(resource, decision_id)
            self._refuse_early(*asked, context, "unavailable", "facts_stale", why)
        if self.suspended(caller) is not None:
            await self.refuse_suspended(
                caller, server, method, action, resource, context, decision_id, arguments
            )
        if unpinned is not None:  # with the accepted and listed digests
            digests = {"pinned": unpinned.pinned, "listed": unpinned.listed}
            noted = {**context, f"{unpinned.kind}_pin": digests}
            why = refused(resource.id, decision_id, unpinned.reason, **digests)
            self._refuse_early(*asked, noted, "deny", unpinned.reason, why)
        shown = repr(resource)  # as records and counters spell it
        if method in COUNTED_METHODS:
            context = await self._behavior_context(caller, shown, context)
        if isinstance(session := context.get(CONTEXT_FIELD), SessionView):
            await self.labels.prepare(session)
        if (changing := self.facts_in_force()) is not None:
            await changing  # one began while the counters or labels were read (`settled`)
        authz = self.authorizer()
        position = self.position()  # of the policy and facts ``authz`` decides on
        chain = self.decisions(
            authz, caller.principals, action, resource, context, caller.scopes, caller.task
        )
        # Asked only of a downgraded caller's tool call: one attribute read more on the usual
        # path.
        if chain.obligations.read_only and annotations_now is not None:
            context, authz, position, chain = await self._read_now(
                caller, action, resource, context, annotations_now
            )
        obligations = chain.obligations
        result, reason = policy_result(
            chain, action, resource, context, caller.auth_time, self.clock
        )
        made: Obligated | None = None  # none for a message they ask nothing of
        linked: ApprovalRequest | None = None  # the approval request the message is linked to
        nobody: NoApprover | None = None  # why nobody could answer the hold, where nobody could
        unheld = ""  # the kind of that hold ("approval" or "review")
        if result == "allow" and (
            obligations.requires_approval
            or obligations.requires_review
            or (obligations.rate_limits and from_client)
        ):
            made = await self._obligations(
                authz,
                decision_id,
                caller,
                server,
                method,
                action,
                resource,
                context,
                arguments,
                chain,
                retried,
                runs_for,
                from_client,
                holds,
            )
            # Decided again, with the approval, when one was given: ``chain`` is that decision.
            chain, result, reason = made.chain, made.result, made.reason
            linked, nobody = made.linked, made.nobody
            # Refused before the call runs (a request nobody may answer any more is ``linked``).
            unheld = "review" if nobody is not None else ""
        if made is not None and (held := made.held) is not None and held[1].state == "hold":
            try:
                why = self._why_held(
                    authz, caller.principals, action, resource, context, held[0].kind
                )
                linked = await anyio.to_thread.run_sync(
                    self.approvals.hold,
                    held[0],
                    decision_id,
                    why,
                    context,  # type: ignore[union-attr]
                )
            except NoApprover as refusal:  # held, it would wait for nobody
                if refusal.suspended is not None:
                    # Stored, though this replica's view had not heard of it yet: refused as
                    # the kill switch refuses where it has.
                    await self._refuse_as_suspended(refusal.suspended, asked, given)
                result, reason, linked, nobody = "deny", refusal.reason, None, refusal
                unheld = held[0].kind
            except Exception:
                log.exception("the approval store cannot be written: call refused")
                result, reason, linked = "deny", "approval_unavailable", None
        # Read before this message is counted (`_record`): the figures the decision saw.
        behaving = self._behavior_alerts(caller, context)
        record = self._record(
            authz,
            decision_id,
            caller,
            server,
            method,
            action,
            resource,
            shown,
            context,
            arguments,
            chain,
            result,
            reason,
            started,
            position,
            approval=(
                _linked(linked, made.approved if made is not None else None)
                if linked is not None
                # A hold nobody could answer, refused: no request, but the hold's refusal, not
                # the decision's (`bastion.audit.replay` does not replay an ``evaluation_limit``
                # of the approver rules as the policy's).
                else {"kind": unheld}
                if unheld
                else None
            ),
            counted=made is not None and made.counted,
        )
        # The decision's alert rules, the built-in ``behaving`` alerts, a refusal counted
        # towards a refusal burst: without any, nothing to raise.
        if self.alerts is not None and (chain.obligations.alerts or behaving or result == "deny"):
            await self._raise_alerts(caller, chain, decision_id, result, reason, record, behaving)
        if result != "allow":
            self._refuse(
                decision_id,
                resource.id,
                chain,
                result,
                reason,
                made.retry_after if made is not None else None,
                linked,
                nobody,
            )
        if made is None:
            return Verdict(decision_id, chain.obligations, record)
        if (review := made.review) is not None:
            step = "release" if review[1].state == "released" else "hold"
            return Verdict(
                decision_id,
                chain.obligations,
                record,
                step,
                review[1].request,
                review[0],
                made.spent,
            )
        return Verdict(decision_id, chain.obligations, record, spent=made.spent)

    async def _read_now(
        self,
        caller: Caller,
        action: str,
        resource: Entity,
        context: dict[str, Any],
        annotations_now: Callable[[], Awaitable[dict[str, Any]]],
    ) -> tuple[dict[str, Any], Authorizer, tuple[int | None, int | None], ChainDecision]:
        """A downgraded caller's tool call, decided again on what the upstream says of the tool
        now: what it listed last may be out of date (a read-only tool become a write, or the
        other way round), without bastion hearing of it (no ``notifications/tools/list_changed``,
        or none heard: bastion listens only while a client does). The context, authorizer,
        position and decision to go on with."""
        context = {**context, "annotations": await annotations_now()}
        await self.settled()  # the upstream was waited for: see `settled`
        authz, position = self.authorizer(), self.position()
        chain = self.decisions(
            authz, caller.principals, action, resource, context, caller.scopes, caller.task
        )
        return context, authz, position, chain

    async def _obligations(
        self,
        authz: Authorizer,
        decision_id: str,
        caller: Caller,
        server: str,
        method: str,
        action: str,
        resource: Entity,
        context: dict[str, Any],
        arguments: Any,
        chain: ChainDecision,
        retried: str | None,
        runs_for: float,
        from_client: bool,
        holds: bool,
    ) -> Obligated:
        """What an allowed message's approval, review and rate limits make of it (`Obligated`:
        the approval it spends is marked in progress for ``runs_for``). A message not
        ``from_client`` (`decide`) is counted under no rate limit; for one that does not
        ``holds``, no request is looked up, filed or spent: an approval it needs refuses it, and
        a review, but on ``connect``."""
        result, reason, retry_after = "allow", "", None
        nobody: NoApprover | None = None
        held: tuple[Call, Outcome] | None = None
        review: tuple[Call, Outcome] | None = None
        linked: ApprovalRequest | None = None
        spend: ApprovalRequest | None = None
        # The review holding the result of the run this call's approval was spent on.
        under_review: ApprovalRequest | None = None
        # The approval the run whose result is under review used.
        approved: ApprovalRequest | None = None
        if chain.obligations.requires_approval and not chain.obligations.approval_granted:
            if not holds:
                # Nobody waits on it: a person would be asked to approve what can never run,
                # and an approval given for the client's next message must stay its own.
                return Obligated(chain, "deny", "requires_approval")
            call = self._call("approval", caller, server, method, action, resource, arguments)
            outcome = await self._where(call, retried)
            linked = outcome.request
            if outcome.state in ("approved", "reviewing"):
                assert outcome.request is not None
                # Decided again with the approval in the context: the policy stays the judge.
                approval = _approval_context(outcome.request)
                chain = decide_chain(
                    authz,
                    caller.principals,
                    action,
                    resource,
                    {**context, "approval": approval},
                    granted_scopes=caller.scopes,
                    task=caller.task,
                )
                decided = policy_result(
                    chain, action, resource, context, caller.auth_time, self.clock
                )
                if not chain.allowed or chain.missing_scopes or chain.reason is not None:
                    result, reason = "deny", chain.reason or "not_permitted"
                elif decided[0] != "allow":
                    # What the call is allowed with is this decision's: its read-only mode and
                    # the sign-in it asks for hold as much as the first decision's.
                    result, reason = decided
                elif outcome.state == "approved":
                    spend = outcome.request  # once everything else has let it through
                else:
                    under_review, approved = outcome.review, outcome.request
            elif outcome.state in ("hold", "pending"):
                result, reason = "held", "approval_pending"
                held = (call, outcome)
            elif outcome.state == "in_progress":
                # Its approval was spent on this very call, still upstream: told so, neither
                # run again nor held for a new approval.
                result, reason = "held", "approval_in_progress"
            else:
                result, reason, nobody = "deny", outcome.reason, outcome.nobody
        # A result under review is the reviewer's to release, whatever the policy says of
        # reviews now: its call, approved once, never runs again without a new approval.
        if not holds:
            if result == "allow" and chain.obligations.requires_review and action != "connect":
                # Its answer would be held for a person nobody waits on; a connect has none.
                result, reason = "deny", "review_required"
        elif result == "allow" and (chain.obligations.requires_review or under_review is not None):
            call = self._call("review", caller, server, method, action, resource, arguments)
            if spend is not None:
                # A run an approval was given for: its result gets a review of its own, never
                # an earlier run's (which goes to the retry of that run).
                outcome = Outcome("hold")
            else:
                # The review under way, named by its id, is pending, released or refused:
                # never "hold" (which would run the call again).
                outcome = await self._where(call, under_review.id if under_review else retried)
            review = (call, outcome)
            linked = outcome.request or linked
            if outcome.state == "hold" and (refusal := await self._unanswerable(call, context)):
                # Refused before the call runs: its result would be held for nobody.
                result, (reason, nobody) = "deny", refusal
            elif outcome.state == "pending":
                result, reason = "held", "review_pending"
                held = (call, outcome)
            elif outcome.state == "refused":
                result, reason, nobody = "deny", outcome.reason, outcome.nobody
        counted = result == "allow" and from_client and bool(chain.obligations.rate_limits)
        if counted:
            try:
                retry_after = await self.limiter.admit(
                    chain.obligations.rate_limits, action, resource, decision_id
                )
            except LimitsUnavailable:
                # Fail closed: a limit that cannot be counted is not a limit that let it pass.
                result, reason = "unavailable", "rate_limit_unavailable"
            else:
                if retry_after is not None:
                    result, reason = "rate_limited", "rate_limited"
        # Used once: of two identical retries at the same moment, one goes through.
        if (
            result == "allow"
            and spend is not None
            and (refusal := await self._spend(spend, decision_id, runs_for)) is not None
        ):
            result, reason = "deny", refusal
            if counted:
                # A refused call is counted under none of its limits (docs/gateway.md).
                counted = not await self._give_back(chain, action, resource, decision_id)
        return Obligated(
            chain,
            result,
            reason,
            retry_after,
            held,
            review,
            linked,
            spend if result == "allow" else None,
            nobody,
            counted,
            approved,
        )

    async def _give_back(
        self, chain: ChainDecision, action: str, resource: Entity, decision_id: str
    ) -> bool:
        """Take the call ``decision_id``, counted under ``chain``'s rate limits and then
        refused, out of their counters; False where it stays counted (the shared counters
        cannot be reached: the record then lists the limits as applied)."""
        limits = chain.obligations.rate_limits
        try:
            return await self.limiter.give_back(limits, action, resource, decision_id)
        except Exception:
            log.exception("a refused call's count cannot be given back: it stays counted")
            return False

    def _refuse(
        self,
        decision_id: str,
        target: str,
        chain: ChainDecision,
        result: str,
        reason: str,
        retry_after: float | None,
        linked: ApprovalRequest | None,
        nobody: NoApprover | None = None,
    ) -> None:
        """Raise what a message that is not allowed answers: `StepUp`, `Held` or an `RpcError`
        (``nobody``: why nobody could answer its hold, where that refused it)."""
        if result == "step_up":
            max_age = chain.obligations.max_auth_age if reason == SIGN_IN_AGAIN else None
            raise StepUp(chain.missing_scopes, decision_id, max_age)
        if result == "held":
            assert linked is not None and self.approvals is not None
            raise Held(
                linked,
                decision_id,
                self.approvals.url(linked.id),
                self.approvals.settings.retry_after_seconds,
                reason,
                target,
            )
        if result == "rate_limited":
            assert retry_after is not None  # a rate limit refuses with the seconds to wait
            raise RpcError(
                RATE_LIMITED,
                f"bastion refused this request ({target}): rate limited",
                {
                    "decision_id": decision_id,
                    "reason": reason,
                    "retry_after": round(retry_after, 3),
                },
            )
        if result == "unavailable":
            raise RpcError(
                RATE_LIMIT_UNAVAILABLE,
                f"bastion refused this request ({target}): its rate limit cannot be checked"
                " right now (the shared counters are unreachable); try again later",
                {"decision_id": decision_id, "reason": reason},
            )
        extra = {"approval_id": linked.id} if linked is not None else {}
        meaning = nobody.meaning if nobody is not None else None
        if chain.undecided is not None and reason == UndecidedQuestion.reason:
            meaning = (
                f"the policy's {chain.undecided} rule cannot be decided for this request (a value"
                " of another kind, or arithmetic with no result), and it is not let through"
                " without it"
            )
        raise refused(target, decision_id, reason, meaning, **extra)

    def _behavior_alerts(
        self, caller: Caller, context: dict[str, Any]
    ) -> list[tuple[Entity, str, str, dict]]:
        """The built-in alerts the caller's behaviour figures call for, each with the principal
        it is raised for: the calling agent, or the user its figures add up to (none without
        alerts or counters; counters that cannot be read raise nothing: the decision took care
        of itself)."""
        behavior = context.get("behavior")
        if self.alerts is None or not isinstance(behavior, BehaviorView):
            return []
        destructive = (context.get("annotations") or {}).get("destructiveHint") is True
        try:
            raised = self.alerts.behavior_alerts(behavior, destructive, person=caller.person)
        except BehaviorUnavailable:
            return []
        if not raised:
            return []
        principals = caller.principals
        by_scope = {"agent": principals[-1], "user": principals[0]}
        return [(by_scope[scope], name, severity, more) for scope, name, severity, more in raised]

    async def _raise_alerts(
        self,
        caller: Caller,
        chain: ChainDecision,
        decision_id: str,
        result: str,
        reason: str,
        record: dict[str, Any],
        behaving: list[tuple[Entity, str, str, dict]],
    ) -> None:
        """The decision's ``alert`` rules, the built-in ``behaving`` alerts, and a refusal
        counted towards a refusal burst (`decide` calls it when there is one of them)."""
        alerts = self.alerts
        raised = chain.obligations.alerts
        detail = {
            "server": record["server"],
            "method": record["method"],
            "target": record["target"],
            "result": result,
            "reason": reason,
        }
        raisings = [(name, severity, principal, detail) for principal, name, severity in raised]
        raisings += [
            (name, severity, principal, {**detail, **more})
            for principal, name, severity, more in behaving
        ]
        if result == "deny":
            for principal in caller.principals:
                if (burst := alerts.refusal_burst(principal, detail)) is not None:
                    raisings.append(burst)
        await alerts.raise_all(raisings, decision_id, caller.principals)

    # -- holds for people -----------------------------------------------------------------------

    def _call(
        self,
        kind: str,
        caller: Caller,
        server: str,
        method: str,
        action: str,
        resource: Entity,
        arguments: Any,
    ) -> Call:
        return Call(
            kind,
            caller.subject,
            caller.client_id,
            server,
            method,
            action,
            resource,
            arguments,
            self.digest(arguments),
            caller.agents,
            caller.task,
        )

    async def _where(self, call: Call, retried: str | None) -> Outcome:
        """Where the call stands with the people who must answer for it; refused (fail closed)
        when nobody can hold it or the approval store cannot be read."""
        if self.approvals is None:
            return Outcome("refused", reason="approval_unavailable")
        try:
            outcome = await anyio.to_thread.run_sync(self.approvals.check, call, retried)
        except Exception:
            log.exception("the approval store cannot be read: call refused")
            return Outcome("refused", reason="approval_unavailable")
        # A fact change that began while the store was read holds the fact lock: waited for
        # here, not on the event loop by the decision that follows.
        await self.settled()
        return outcome

    async def _unanswerable(
        self, call: Call, context: dict[str, Any]
    ) -> tuple[str, NoApprover | None] | None:
        """Why ``call`` cannot be held for people, or None: the reason, and the `NoApprover`
        that says why nobody could answer it (``no_approver``; ``evaluation_limit``: the rules
        on who may answer spent the budget), or None (``approval_unavailable``: who could is not
        known now). Asked of a call whose result would be held for review, before it runs,
        whoever stands behind it (a user forbidden to review their own call's result answers
        nothing); a call held for approval learns it from `Approvals.hold`."""
        assert self.approvals is not None
        try:
            await anyio.to_thread.run_sync(self.approvals.answerers, call, context)
        except NoApprover as why:
            return why.reason, why
        except Exception:
            log.exception("who may review this result cannot be read: call refused")
            return "approval_unavailable", None
        return None

    async def _spend(
        self, request: ApprovalRequest, decision_id: str, runs_for: float = 0.0
    ) -> str | None:
        """Spend ``request`` for the call ``decision_id`` (an approval: its run marked in
        progress for ``runs_for``): None once spent, else why the call is refused:
        ``approval_used`` (spent already; of two retries at once, one goes through),
        ``approval_expired`` / ``review_expired`` (its expiry came between the check that found
        it and this) or ``approval_unavailable`` (the store cannot be written, a lock wait ran
        out: not known spent, so the client may try again, not told it was used)."""
        assert self.approvals is not None
        try:
            used = await anyio.to_thread.run_sync(
                self.approvals.use, request, decision_id, runs_for
            )
        except Exception:
            log.exception("the approval store cannot be written: call refused")
            return "approval_unavailable"
        if used:
            return None
        if request.expires_at <= self.clock():
            return "approval_expired" if request.kind == "approval" else "review_expired"
        return "approval_used"

    def keep_running(self, verdict: Verdict, runs_for: float) -> asyncio.Task[None]:
        """Renew the mark of the run ``verdict``'s call spent its approval on (`Verdict.spent`)
        while that run is in flight here: every third of ``runs_for`` (one renewal that fails
        still leaves a third of it), to ``runs_for`` from then, so that a run longer than the
        bound it was spent with (an upstream that asks the client round after round) keeps its
        retries told it is in progress. The caller cancels the task returned once the run has ended, failed or been
        cancelled: the mark then ends (`run_ended`) or lapses at most ``runs_for`` after its
        last renewal, as it does when the process dies. Asked only for a call that spent an
        approval."""
        assert verdict.spent is not None
        return asyncio.create_task(self._renew_run(verdict.spent.id, verdict.decision_id, runs_for))

    async def _renew_run(self, request_id: str, decision_id: str, runs_for: float) -> None:
        assert self.approvals is not None
        every = runs_for / 3
        # The approval store away is said once per run, not at every renewal.
        outage = Outage(log)
        while True:
            await asyncio.sleep(every)
            try:
                marked = await anyio.to_thread.run_sync(
                    self.approvals.renew_run, request_id, decision_id, runs_for
                )
            except Exception as e:
                outage.failed(
                    "the mark of an approved run in flight (%s) cannot be renewed: %s;"
                    " tried once more %gs later",
                    request_id,
                    first_line(e),
                    every,
                    kind=kind_of(e),
                    level=logging.ERROR,
                    exc_info=not isinstance(e, DatabaseUnavailable),
                )
                continue
            outage.ended("the mark of an approved run in flight (%s) is renewed again", request_id)
            if not marked:
                return  # ended, or given back: nothing is marked any more

    async def run_ended(self, verdict: Verdict, unsent: tuple[str, str] | None = None) -> None:
        """The run of ``verdict``'s call has ended (answered, its result held for review first
        where it is; or failed): the approval it spent no longer tells the same call its run
        is in progress. ``unsent``: it failed before anything of it left bastion (the class and
        the message of the error): the approval is given back, approved as it was, for the
        retry (`Approvals.unspend`). Nothing to do for a call that spent none. Not written
        (the store away), the mark lapses at the bound it was spent with, and the approval
        stays spent."""
        if verdict.spent is None or self.approvals is None:
            return
        try:
            if unsent is not None:
                await anyio.to_thread.run_sync(
                    self.approvals.unspend, verdict.spent, verdict.decision_id, *unsent
                )
            else:
                await anyio.to_thread.run_sync(
                    self.approvals.run_ended, verdict.spent.id, verdict.decision_id
                )
        except Exception:
            log.exception("the end of an approved run cannot be written: its mark lapses")

    async def run_cancelled(self, verdict: Verdict, unsent: tuple[str, str]) -> None:
        """`run_ended` for a run cancelled (its client cancelled it or went away, or bastion is
        stopping) before anything of it left bastion: its approval given back. Called while its
        task is being cancelled, where a cancel scope would cancel every further await again:
        the write runs in a task of its own, waited for shielded, at most
        `GIVE_BACK_WAIT_SECONDS` (it goes on after that, or after another cancellation)."""
        if verdict.spent is None or self.approvals is None:
            return
        giving_back = asyncio.ensure_future(self.run_ended(verdict, unsent))
        _giving_back.add(giving_back)
        giving_back.add_done_callback(_giving_back.discard)
        with anyio.CancelScope(shield=True):
            try:
                async with asyncio.timeout(GIVE_BACK_WAIT_SECONDS):
                    await asyncio.shield(giving_back)
            except TimeoutError:
                log.warning(
                    "giving back the approval of a call cancelled before it was sent takes"
                    " longer than %gs: it goes on meanwhile",
                    GIVE_BACK_WAIT_SECONDS,
                )

    async def release(self, verdict: Verdict) -> tuple[Any, str | None]:
        """The reviewed result of this call, spent once, and None; or None and why it is not
        delivered (`_spend`'s reasons; ``approval_used`` too when it was delivered
        meanwhile)."""
        assert self.approvals is not None and verdict.review is not None
        request = verdict.review
        try:
            result = await anyio.to_thread.run_sync(self.approvals.held_result, request)
        except Exception:
            log.exception("the approval store cannot be read: result not released")
            return None, "approval_unavailable"
        if not isinstance(result, dict):
            return None, "approval_used"
        refusal = await self._spend(request, verdict.decision_id)
        return (None, refusal) if refusal is not None else (result, None)

    async def hold_result(self, verdict: Verdict, result: Any, context: dict[str, Any]) -> Held:
        """Keep the upstream's result for a reviewer; the `Held` to answer the client with."""
        assert self.approvals is not None and verdict.call is not None
        call, approvals = verdict.call, self.approvals
        await self.settled()
        principals = tuple(Entity.parse(p) for p in verdict.record["principals"])
        why = self._why_held(
            self.authorizer(), principals, call.action, call.resource, context, "review"
        )
        request = await anyio.to_thread.run_sync(
            lambda: approvals.hold(call, verdict.decision_id, why, context, result)
        )
        return Held(
            request,
            verdict.decision_id,
            self.approvals.url(request.id),
            self.approvals.settings.retry_after_seconds,
            "review_pending",
            call.resource.id,
        )

    def _why_held(
        self,
        authz: Authorizer,
        principals: tuple[Entity, ...],
        action: str,
        resource: Entity,
        context: dict[str, Any],
        kind: str,
    ) -> tuple[str, ...]:
        """The rules that required the hold, for the people who answer it."""
        predicate = "requires_approval" if kind == "approval" else "requires_review"
        rules: list[str] = []
        with authz.session(context) as s:
            for principal in principals:
                for rule in s.prove(predicate, principal, action, resource).rules():
                    if rule not in rules:
                        rules.append(rule)
        return tuple(rules)

    async def refuse_suspended(
        self,
        caller: Caller,
        server: str,
        method: str,
        action: str,
        resource: Entity,
        context: dict[str, Any],
        decision_id: str | None = None,
        arguments: Any = None,
    ) -> None:
        """The kill switch: if the caller's agent, user or session is suspended, raise the
        refusal (reason ``suspended``), recorded and alerted. `decide` asks it first; so do the
        messages no decision is made for (``ping``, a client's notification or response)."""
        suspended = self.suspended(caller)
        if suspended is None:
            return
        asked = (decision_id or new_decision_id(), caller, server, method, action, resource)
        await self._refuse_as_suspended(suspended, (*asked, arguments), context)

    async def _refuse_as_suspended(
        self,
        suspended: Entity,
        asked: tuple[str, Caller, str, str, str, Entity, Any],
        context: dict[str, Any],
    ) -> NoReturn:
        """Refuse the message ``asked`` (decision id, caller, server, method, action, resource,
        arguments) of ``suspended``'s as the kill switch does (`suspension_refusal`), recorded
        as a refusal made before the policy was asked: whether this replica's view held the
        suspension (`refuse_suspended`) or its hold found it stored (`NoApprover.suspended`)."""
        decision_id, caller, server, method, _, resource, _ = asked
        noted, why = await self.suspension_refusal(
            suspended, decision_id, server, method, resource, context, caller.principals
        )
        self._refuse_early(*asked, noted, "deny", "suspended", why)

    async def suspension_refusal(
        self,
        suspended: Entity,
        decision_id: str,
        server: str,
        method: str,
        resource: Entity,
        context: dict[str, Any],
        chain: tuple[Entity | str, ...],
    ) -> tuple[dict[str, Any], RpcError]:
        """The kill switch's refusal of a message of ``suspended``'s, wherever it is found out:
        the alert raised (a suspended agent, user or session that still calls is worth telling
        its owner: ``suspended_still_calling``, one per cooldown, `Alerts.raise_alert`; about
        the message's ``chain`` too), the context its record notes (who is suspended) and the
        error the agent gets (reason ``suspended``). The caller records the refusal and raises
        the error."""
        if self.alerts is not None:
            detail = {"server": server, "method": method, "target": repr(resource)}
            raising = ("suspended_still_calling", "high", suspended, detail)
            await self.alerts.raise_all([raising], decision_id, chain)
        noted = {**context, "suspended": repr(suspended)}
        return noted, refused(resource.id, decision_id, "suspended")

    def _refuse_early(
        self,
        decision_id: str,
        caller: Caller,
        server: str,
        method: str,
        action: str,
        resource: Entity,
        arguments: Any,
        context: dict[str, Any],
        result: str,
        reason: str,
        error: Exception,
    ) -> NoReturn:
        """Record a refusal made before the policy was asked (stale facts, the kill switch, a
        tool or prompt not as pinned; what it noted is in ``context``), and raise ``error``."""
        principals = tuple(repr(p) for p in caller.principals)
        self.write(
            self._fields(
                decision_id,
                caller,
                server,
                method,
                repr(resource),
                principals,
                result,
                arguments,
                context,
                reason,
                self.position(),
                action=action,
            )
        )
        raise error

    def _fields(
        self,
        decision_id: str,
        caller: Caller,
        server: str,
        method: str,
        target: str,
        principals: tuple[str, ...],
        result: str,
        arguments: Any,
        context: dict[str, Any],
        reason: str,
        position: tuple[int | None, int | None],
        deciding: str = "",
        rules: tuple[str, ...] = (),
        obligations: dict[str, Any] | None = None,
        latency_us: int = 0,
        action: str = "",
    ) -> dict[str, Any]:
        """The fields of a decision record (`DecisionRecord`): every record the gateway writes
        is built here, and journalled here (`bastion.audit.journal`). ``position``: the policy
        version in force and the change-log sequence the facts stood at when it was decided,
        read with the `Authorizer` that decided; ``action``: the action it asked of the policy
        (a record's question, as `bastion audit replay` asks it again)."""
        policy_version, sequence = position
        fields = {
            "id": decision_id,
            "at": self.clock(),
            "server": server,
            "method": method,
            "target": target,
            "principals": principals,
            "result": result,
            "arguments_digest": self.digest(arguments),
            "context": _without_arguments(context),
            "deciding_principal": deciding,
            "rules": rules,
            "obligations": {} if obligations is None else obligations,
            "reason": reason,
            "latency_us": latency_us,
            "policy_version": policy_version,
            "sequence": sequence,
            "grant_id": caller.grant_id,
            "task": caller.task,
            "session": caller.session_id,
            "action": action,
        }
        # Journalled now, before the call goes upstream: its record is written later, and a
        # process killed meanwhile would leave no trace of the decision (bastion.audit.journal).
        if self.records is not None and (journal := self.records.journal) is not None:
            journal.append(fields)
        return fields

    def _record(
        self,
        authz: Authorizer,
        decision_id: str,
        caller: Caller,
        server: str,
        method: str,
        action: str,
        resource: Entity,
        shown: str,
        context: dict[str, Any],
        arguments: Any,
        chain: ChainDecision,
        result: str,
        reason: str,
        started: float,
        position: tuple[int | None, int | None],
        approval: dict[str, str] | None = None,
        counted: bool = False,
    ) -> dict[str, Any]:
        """The decision record of ``chain`` (``shown``: ``resource`` as records spell it),
        counted and written if it is a refusal; an allowed one is written once its obligations
        are applied. ``counted``: the rate limits' counters were asked about the message (it
        was counted under its limits, or refused by them: its result says which). Not (what
        bastion sends a client unasked; a message held, or refused before the counters), the
        rate limits the policy named are listed as ``rate_limits_not_counted``, and none as
        applied."""
        question = (explained_principal(chain), action, resource)
        rules = self.explained.get(chain.generation, question, context)
        if (
            rules is None
            and result in ("deny", "held", "rate_limited", "unavailable")
            and reason != EvaluationLimit.reason  # explaining would spend the budget again
        ):
            # Refusals are explained on the spot; allows when the record is written (`write`),
            # off the request path: an explanation costs a few hundred microseconds.
            rules = self.explained.explain(authz, question, context)
        spelled = self._spelled
        if spelled is None or spelled.chain is not chain:
            spelled = self._spelled = Spelled(chain)
        obligations = dict(spelled.obligations)
        if not counted and obligations["rate_limits"]:
            # A record says what was done: read months later, a limit listed as applied would
            # say this message was counted under it.
            obligations["rate_limits_not_counted"] = obligations["rate_limits"]
            obligations["rate_limits"] = []
        if approval is not None:
            # The request that held it, or whose approval (or released result) it used.
            obligations["approval"] = approval
        record = self._fields(
            decision_id,
            caller,
            server,
            method,
            shown,
            spelled.principals,
            result,
            arguments,
            context,
            reason,
            position,
            spelled.deciding,
            rules or (),
            obligations,
            int((time.perf_counter() - started) * 1e6),
            action,
        )
        self._signals(authz, chain, action, resource, context, record)
        if result != "allow":
            self.write(record)
        elif rules is None:
            record["_explain"] = (authz, question, context)
        return record

    def record_heard(
        self,
        authz: Authorizer,
        position: tuple[int | None, int | None],
        caller: Caller,
        server: str,
        method: str,
        resource: Entity,
        context: dict[str, Any],
        chain: ChainDecision,
        heard: bool,
        started: float,
    ) -> None:
        """Record whether ``caller`` is to hear of ``resource``, decided outside `decide` with no
        obligation applied (`bastion.gateway.sessions.read_decision`: a listen filter's
        resources): ``heard``, allowed; otherwise denied with the policy's reason, or the
        obligation that would have had a person approve or review a read. So a filter cannot
        learn what its caller may read and leave no trace."""
        if heard:
            result, reason = "allow", ""
        else:
            result, reason = policy_result(
                chain, "read", resource, context, caller.auth_time, self.clock
            )
            if result == "allow":
                duties = chain.obligations
                reason = "requires_approval" if duties.requires_approval else "requires_review"
            result = "deny"
        shown = repr(resource)
        record = self._record(
            authz, new_decision_id(), caller, server, method, "read", resource, shown,
            context, None, chain, result, reason, started, position, counted=False,
        )  # fmt: skip
        if heard:
            self.write(record)

    # -- behaviour and shadow rules (bastion.signals) ------------------------------------------

    async def _behavior_context(
        self, caller: Caller, target: str, context: dict[str, Any]
    ) -> dict[str, Any]:
        view = self.behavior.view(caller.subject, caller.client_id, target)
        await self.behavior.prepare(view)
        return {**context, "behavior": view}

    def _signals(
        self,
        authz: Authorizer,
        chain: ChainDecision,
        action: str,
        resource: Entity,
        context: dict[str, Any],
        record: dict[str, Any],
    ) -> None:
        """Count the decided message; record what shadow rules would have done."""
        # Shadow rules first: they see the figures the decision saw, without this message.
        if chain.reason is None:
            self.shadow.evaluate(authz, chain.principals, action, resource, context, record)
        if record["method"] in COUNTED_METHODS:
            self.behavior.observe_decision(record, context)

    async def record_labels(self, caller: Caller, verdict: Verdict) -> None:
        """Add the labels of the target of ``verdict`` to ``caller``'s label set and to the
        own set of each agent of its chain (`label_keys`), before its result is released; when
        they cannot be kept, the result is withheld: the refusal is recorded and raised
        (`LabelsUnavailable`, `LabelsFull`)."""
        labels = verdict.obligations.labels
        if not labels:
            return
        try:
            await self.labels.record(label_keys(caller), labels)
        except (LabelsUnavailable, LabelsFull) as e:
            self.write(verdict.record, result="deny", reason=e.reason)
            target = Entity.parse(verdict.record["target"]).id
            raise refused(target, verdict.decision_id, e.reason) from None

    def write(self, record: dict[str, Any], **more: Any) -> None:
        """Buffer a decision record (an allowed one once its obligations are known)."""
        if self.records is None:
            return
        fields = {**record, **more}
        if more and (journal := self.records.journal) is not None:
            journal.amend(record, more)
        explain = fields.pop("_explain", None)
        rules = partial(self.explained.explain, *explain) if explain else None
        self.records.add(DecisionRecord.of(fields), rules)


class Spelled:
    """What a decision record says of a `ChainDecision`, whatever the message: its principals,
    the one it turned on, and its obligations (but the approval a message used). Spelled once
    per answer: a remembered answer is the same object each time, and the gateway keeps the
    last one's. ``obligations`` is copied into each record; the lists in it are shared by the
    records of one answer, and never changed."""

    __slots__ = ("chain", "principals", "deciding", "obligations")

    def __init__(self, chain: ChainDecision) -> None:
        self.chain = chain
        self.principals = principals = tuple(map(repr, chain.principals))
        deciding = chain.refused_by
        # Mostly the last principal, spelled already.
        self.deciding = (
            principals[-1]
            if deciding is None or deciding is chain.principals[-1]
            else repr(deciding)
        )
        applied = chain.obligations
        obligations: dict[str, Any] = {
            "masks": list(applied.masks),
            "rate_limits": [
                {"principal": repr(r.principal), "max": r.max, "seconds": r.seconds}
                for r in applied.rate_limits
            ],
            "required_scopes": list(applied.required_scopes),
        }
        if chain.missing_scopes:
            obligations["missing_scopes"] = list(chain.missing_scopes)
        if applied.read_only:
            obligations["read_only"] = True
        if applied.max_auth_age is not None:
            obligations["max_auth_age"] = applied.max_auth_age
        if chain.stale_signals:
            obligations["stale_signals"] = list(chain.stale_signals)
        if chain.undecided is not None:
            obligations["undecided"] = chain.undecided
        self.obligations = obligations


class Explained:
    """The rules that decided each question, kept until the facts or the policy change.

    An explanation depends only on the policy, the facts, the question and the ``context``
    paths its search read (`Explanation.reads`). So within one generation of the facts
    (`Session.generation`), a question asked again with a context that agrees on those paths
    has the same rules, and need not be explained again. Written by the record writer's
    thread, read on the event loop: the state is swapped whole, never changed under a reader.
    """

    QUESTIONS = 4096  # questions remembered per generation
    VARIANTS = 8  # contexts remembered per question

    def __init__(self) -> None:
        self._state: tuple[int, dict[tuple, list]] = (-1, {})
        self._lock = threading.Lock()

    def get(self, generation: int, question: tuple, context: dict) -> tuple[str, ...] | None:
        known_generation, known = self._state
        if generation != known_generation:
            return None
        for reads, rules in known.get(question, ()):
            if not reads:  # decided without reading the context
                return rules
            if all(same_value(context_value(context, path), seen) for path, seen in reads):
                return rules
        return None

    def explain(self, authz: Authorizer, question: tuple, context: dict) -> tuple[str, ...]:
        """Explain ``question`` on the facts in force now, and remember the answer."""
        with authz.session(context) as s:
            explanation = s.explain(*question)
            generation = s.generation
        rules = tuple(explanation.rules())
        with self._lock:
            known_generation, known = self._state
            if generation != known_generation or len(known) >= self.QUESTIONS:
                if generation < known_generation:
                    return rules  # the facts moved on while this was explained
                known = {}
            else:
                known = dict(known)
            variants = known[question] = list(known.get(question, ()))
            if len(variants) < self.VARIANTS:
                variants.append((tuple(explanation.reads.items()), rules))
            self._state = (generation, known)
        return rules


def label_key(caller: Caller) -> LabelKey:
    """The label set of ``caller``: its user, the first agent of its chain, and the task of the
    token its chain began with (a delegation into a task keeps its subject's set)."""
    task = caller.task if caller.labels_task is None else caller.labels_task
    return LabelKey.of(caller.subject, caller.agents, caller.client_id, task)


def label_keys(caller: Caller) -> tuple[LabelKey, ...]:
    """The label sets a result released to ``caller`` is recorded in: its chain's set
    (`label_key`), then the own set of each agent of its chain (`LabelKey.own`, once each), so
    that no agent launders what it was shown through its own token. An agent acting as itself
    in no task has one: its chain's set is its own."""
    keys = [label_key(caller)]
    for agent in caller.chain:
        own = LabelKey.own(agent)
        if own not in keys:
            keys.append(own)
    return tuple(keys)


def _without_arguments(context: dict[str, Any]) -> dict[str, Any]:
    """What a decision record keeps of its context: all of it but the arguments (recorded as
    their digest). Copied at C speed: this runs for every decision."""
    seen = dict(context)
    seen.pop("arguments", None)
    return seen


def _linked(request: ApprovalRequest, approved: ApprovalRequest | None) -> dict[str, str]:
    """What a decision record says of the approval request a message is linked to: its id and
    kind, and for a review of a run a person's approval let through, that approval
    (``approval_id``): the review is there because the person approved, whatever the policy
    says of reviews (`bastion.audit.replay` does not replay it as the policy's)."""
    linked = {"id": request.id, "kind": request.kind}
    if approved is not None and approved is not request:
        linked["approval_id"] = approved.id
    return linked


def _approval_context(request: ApprovalRequest) -> dict[str, Any]:
    """What the policy sees of the approval a call comes back with (``context.approval``)."""
    return {
        "id": request.id,
        "approved_by": [a.approver for a in request.approvals],
        "channels": sorted({a.channel for a in request.approvals}),
    }
