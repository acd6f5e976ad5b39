"""The decision contract the gateway enforces: principal chains and obligations.

A request acts for a chain of principals (the user, the agent acting for them, any sub-agent).
It is allowed only if *every* principal is allowed, so an agent never exceeds the person it acts
for. The policy can attach obligations with these rules (each optional):

| rule | obligation |
|---|---|
| ``requires_scope(action, resource, scope)`` | the OAuth token must carry ``scope`` (else step-up) |
| ``mask(actor, action, resource, path)`` | redact the JSON path ``path`` of the result |
| ``rate_limit(actor, action, resource, max, seconds)`` | at most ``max`` calls per ``seconds`` |
| ``requires_approval(actor, action, resource)`` | hold for a person's approval before it runs |
| ``requires_review(actor, action, resource)`` | hold the result for a person before release |
| ``read_only(actor, McpServer{server})`` | only tools annotated ``readOnlyHint`` may be called |
| ``requires_recent_auth(actor, action, resource, seconds)`` | signed in at most ``seconds`` ago |
| ``requires_signal(actor, name, max_age_seconds)`` | refuse unless ``actor`` (each principal, and the call's ``Device``) holds a fresh signal ``name`` |
| ``alert(actor, name, severity)`` | raise the alert ``name`` (`bastion.signals.alerts`) |
| ``label(resource, label)`` | the result, once released, adds ``label`` to the caller's label set (`bastion.delegation.labels`), read back as ``context.session.labels`` |

Token exchange (`bastion.oauth.token_exchange`, RFC 8693) asks two more, deny by default:

| rule | meaning |
|---|---|
| ``may_delegate(from: Agent, to: Agent, server: McpServer)`` | ``from`` may hand its token to ``to`` for this server |
| ``delegated_scope(user: User, from: Agent, to: Agent, server: McpServer, scope)`` | ``scope`` survives the delegation now |

The scopes of a delegated token are those the request asks for (at most the subject token's,
the sub-agent's registered ones and the resource's) for which ``delegated_scope`` holds in the
exchange's ``context`` (`decide_delegation`): without a ``delegated_scope`` rule nothing passes.

``requires_signal`` is answered by ``signal(actor, name, value, source, set_at)`` facts (see
`bastion.signals.store`): a required signal the actor does not have, or one set more than
``max_age_seconds`` before the decision's time (``context.time``), refuses the request with
``reason`` "signal_stale", naming the signals in ``stale_signals`` and the actor in
``refused_by``. Each required signal is checked on its own; a requirement that cannot be checked
(a name that is not text, an age that is not a whole number of seconds) counts as stale: fail
closed. It is asked of each principal of the chain, then of the call's device,
``Device{context.device.id}`` (`call_device`), when a rule names a ``Device``; a call
that names no device is asked about as `NO_DEVICE`, ``Device{""}``, for which no signal counts:
a device requirement that holds whatever the device refuses it.

Alerts are asked of every principal on every decision, allowed or refused (``context`` says
what happened); they never change the answer.

An ``approval_grant(user, agent, action, resource)`` fact (an approval for N minutes, stored
with an expiry) satisfies ``requires_approval`` for that user and chain of agents, under the task
the call's token is for: the chain and task whose call was held (`approval_grant_agent` names
them), no shorter, longer or other chain, and no other task (nor none, for a task's grant; nor
a task, for a grant given under none). The rules about who may approve (``approver`` and its
companions) are asked by `bastion.approvals.service`.

The obligations whose holding restricts are asked as strict code
(`bastion.decide.authorizer.STRICT`): a rule of theirs whose condition cannot be decided
(``requires_approval(...) if context.amount > 1000;`` with an ``amount`` of ``"5000"``) holds.
One whose answers cannot be named at all (which path to mask, which limit: arithmetic with no
result that the rule binds or passes on), or a required scope that is not text (`required_scopes`),
refuses the request with ``reason`` "undecided", ``undecided`` naming the predicate. Other
values of the wrong type restrict the most: a mask path masks the whole result, a rate limit
admits nothing, a sign-in age of 0, a required signal counts as stale.

A request whose evaluation spends its budget is refused with ``reason`` "evaluation_limit": the
enforcement point fails closed, and goes on answering. The questions asked here are compiled
with the policy (`bastion.decide.authorizer.CONTRACT_SHAPES`), never while serving.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from bastion.decide.authorizer import Authorizer, Session
from bastion.facts.model import Entity
from bastion.policy.errors import EvaluationLimit, UndecidedQuestion
from bastion.policy.runtime import ReadContext
from bastion.signals.read_only import REASON as READ_ONLY
from bastion.signals.read_only import read_only_holds, refuses_write
from bastion.signals.step_up import ERROR as SIGN_IN_AGAIN
from bastion.signals.step_up import needs_sign_in, required_auth_age

Answer = TypeVar("Answer")


@dataclass(frozen=True, slots=True)
class RateLimit:
    principal: Entity
    max: int
    seconds: int


@dataclass(frozen=True, slots=True)
class Obligations:
    masks: tuple[str, ...] = ()
    rate_limits: tuple[RateLimit, ...] = ()
    required_scopes: tuple[str, ...] = ()
    requires_approval: bool = False
    # A live approval_grant fact covers the approval this call requires.
    approval_granted: bool = False
    requires_review: bool = False
    # read_only(principal, McpServer{server}) holds: only read-only tools may be called.
    read_only: bool = False
    # requires_recent_auth: the most seconds since the person signed in (None: any).
    max_auth_age: int | None = None
    # (principal, name, severity) for each alert(actor, name, severity) that holds; a name or
    # severity that is not text is kept as its repr, never dropped (the alert still fires).
    alerts: tuple[tuple[Entity, str, str], ...] = ()
    # The target's information-flow labels (label(resource, label)); one that is not text is
    # kept as its repr, never dropped (a result is never released with fewer labels).
    labels: tuple[str, ...] = ()


# An answer without obligations (most refusals): immutable, so one is shared.
NO_OBLIGATIONS = Obligations()


@dataclass(frozen=True, slots=True)
class ChainDecision:
    """The answer for one request over a principal chain."""

    allowed: bool
    principals: tuple[Entity, ...]
    # The first principal the policy did not allow; or, refused "signal_stale", the principal
    # or the call's device (`call_device`, not one of ``principals``) that lacked the signals.
    refused_by: Entity | None = None
    missing_scopes: tuple[str, ...] = ()  # required scopes the token lacks (403 step-up)
    obligations: Obligations = NO_OBLIGATIONS
    generation: int = -1  # the facts and policy it was decided on (`Session.generation`)
    # "evaluation_limit" when refused because the evaluation spent its budget (`limit` says
    # which); None when the policy decided.
    reason: str | None = None
    limit: str | None = None
    # "signal_stale": the required signals missing or too old.
    stale_signals: tuple[str, ...] = ()
    # "undecided": the obligation (its predicate) whose answers could not be named.
    undecided: str | None = None


def explained_principal(decision: ChainDecision) -> Entity:
    """The actor whose ``allow`` explains ``decision``: the principal refused, else the last of
    the chain. A refusal by the call's device is explained as the last principal's ``allow``
    (a ``Device`` is no actor of it); ``refused_by`` and ``stale_signals`` say what refused."""
    refused = decision.refused_by
    if refused is not None and refused in decision.principals:
        return refused
    return decision.principals[-1]


def decide_chain(
    authz: Authorizer,
    principals: Sequence[Entity],
    action: str,
    resource: Entity,
    context: dict | None = None,
    granted_scopes: Iterable[str] | None = None,
    task: str = "",
) -> ChainDecision:
    """Decide ``action`` on ``resource`` for every principal of the chain, with obligations.

    Refused with ``reason`` "signal_stale" when a principal, or the call's device
    (`call_device`), lacks a fresh signal that ``requires_signal`` asks for (measured at
    ``context["time"]``, else now).

    ``granted_scopes`` are the token's scopes; when given, a scope that ``requires_scope``
    demands and the token lacks refuses the request with ``missing_scopes`` set. All of it is
    asked in one `Authorizer.session`: one view of the facts.

    ``task``: the task the call's token is for ("" for none): an approval for minutes counts
    only for calls under the task it was given under (`approval_grant_agent`).
    """
    if not principals:
        return ChainDecision(False, tuple(principals))
    with authz.session(context) as s:
        return decide_chain_in(s, principals, action, resource, context, granted_scopes, task)


def decide_chain_in(
    s: Session,
    principals: Sequence[Entity],
    action: str,
    resource: Entity,
    context: dict | None = None,
    granted_scopes: Iterable[str] | None = None,
    task: str = "",
) -> ChainDecision:
    """`decide_chain` within the session ``s``, in ``context``: several decisions asked in one
    session see one view of the facts and spend one evaluation budget together (a batch is
    bounded as one question); once it is spent, each is refused with "evaluation_limit"."""
    chain = tuple(principals)
    if not chain:
        return ChainDecision(False, chain)
    s.use_context(context)
    try:
        return _decide_chain(s, chain, action, resource, context, granted_scopes, task)
    except EvaluationLimit as limit:
        return ChainDecision(False, chain, reason=limit.reason, limit=limit.limit)
    except UndecidedQuestion as undecided:
        # An obligation with answers that cannot be named (which mask, which limit): refused,
        # never allowed without it.
        return ChainDecision(False, chain, reason=undecided.reason, undecided=undecided.predicate)


def _decide_chain(
    s: Session,
    chain: tuple[Entity, ...],
    action: str,
    resource: Entity,
    context: dict | None,
    granted_scopes: Iterable[str] | None,
    task: str,
) -> ChainDecision:
    generation = s.generation
    alerts = _alerts(s, chain)
    for principal in chain:
        if not s.allowed(principal, action, resource):
            return ChainDecision(
                False,
                chain,
                refused_by=principal,
                obligations=Obligations(alerts=alerts) if alerts else NO_OBLIGATIONS,
                generation=generation,
            )
    stale = _stale_signals(s, chain, context)
    if stale:
        principal, names = stale
        return ChainDecision(
            False,
            chain,
            refused_by=principal,
            obligations=Obligations(alerts=alerts) if alerts else NO_OBLIGATIONS,
            generation=generation,
            reason="signal_stale",
            stale_signals=names,
        )
    required = required_scopes(s, action, resource)
    if granted_scopes is not None:
        granted = set(granted_scopes)
        missing = tuple(scope for scope in required if scope not in granted)
        if missing:
            return ChainDecision(
                False,
                chain,
                missing_scopes=missing,
                obligations=Obligations(required_scopes=required, alerts=alerts),
                generation=generation,
            )
    masks: set[str] = set()
    limits: list[RateLimit] = []
    approval = review = False
    for principal in chain:
        # A path that is not text is still a mask asked for: "" (the whole value, which
        # the gateway withholds), never dropped, which would send the result unmasked.
        masks.update(
            v if isinstance(v, str) else ""
            for v in s.rows("mask", "bbbf", principal, action, resource)
        )
        for n, secs in sorted(s.rows("rate_limit", "bbbff", principal, action, resource), key=repr):
            if type(n) is int and type(secs) is int and secs > 0:
                limits.append(RateLimit(principal, n, secs))
            else:
                # A limit that cannot be counted is still a limit asked for: one that
                # admits nothing (max 0), never dropped, which would admit every call.
                limits.append(RateLimit(principal, 0, 1))
        approval = approval or bool(s.rows("requires_approval", "bbb", principal, action, resource))
        review = review or bool(s.rows("requires_review", "bbb", principal, action, resource))
    granted = approval and _approval_granted(s, chain, action, resource, task)
    read_only = read_only_holds(s, chain, context, resource)
    max_auth_age = required_auth_age(s, chain, action, resource)
    labels = tuple(
        sorted(v if isinstance(v, str) else repr(v) for v in s.rows("label", "bf", resource))
    )
    return ChainDecision(
        True,
        chain,
        obligations=Obligations(
            tuple(sorted(masks)),
            tuple(limits),
            required,
            approval,
            granted,
            review,
            read_only,
            max_auth_age,
            alerts,
            labels,
        ),
        generation=generation,
    )


def required_scopes(s: Session, action: str, resource: Entity) -> tuple[str, ...]:
    """The scopes ``requires_scope`` asks of the token for ``action`` on ``resource``, sorted.
    A scope that is not text (a number, a list a rule took from the request) can be carried by
    no token, and dropped the call would need none: as a mask path or a rate limit that cannot
    be used restricts the most, it refuses the request (`UndecidedQuestion`, ``reason``
    "undecided" naming ``requires_scope``), wherever the decision is asked (the gateway,
    ``/v1/authorize`` with principals, AuthZEN)."""
    scopes = s.rows("requires_scope", "bbf", action, resource)
    for scope in scopes:
        if not isinstance(scope, str):
            raise s.undecided(
                "requires_scope",
                3,
                f"names a scope that is not text (a {type(scope).__name__}): no token can carry"
                " it, so the request is refused; a scope is a string",
            )
    return tuple(sorted(scopes))


def policy_result(
    chain: ChainDecision,
    action: str,
    resource: Entity,
    context: Mapping[str, Any],
    auth_time: int | None,
    clock: Callable[[], float],
) -> tuple[str, str]:
    """What the policy alone makes of ``chain``, as the gateway records it: its result
    (``allow``, ``deny`` or ``step_up``) and the reason of a refusal: a scope the token lacks,
    the budget spent, a principal not allowed, a write under its read-only mode, a sign-in
    (``auth_time``) older than it accepts now (``clock``, read only for an answer that asks for
    a recent sign-in). What people, counters and stores then make of an allowed one
    (approvals, reviews, rate limits, labels) is not the policy's alone."""
    if chain.missing_scopes:
        return "step_up", "insufficient_scope"
    if chain.reason is not None:  # the evaluation spent its budget: refused, not stuck
        return "deny", chain.reason
    if not chain.allowed:
        return "deny", "not_permitted"
    obligations = chain.obligations
    # Asked only of an answer with either obligation: nothing more on the usual path.
    if obligations.read_only or obligations.max_auth_age is not None:
        if refuses_write(obligations.read_only, action, resource, context):
            return "deny", "read_only"
        if needs_sign_in(obligations.max_auth_age, auth_time, clock()):
            return "step_up", SIGN_IN_AGAIN
    return "allow", ""


def refusing_writes(
    decision: ChainDecision, action: str, resource: Entity, context: Mapping[str, Any]
) -> ChainDecision:
    """``decision``, unless it allows a write that its read-only downgrade refuses
    (`refuses_write`: a call of a tool not annotated read-only, a method passed through): then
    that refusal, ``reason`` "read_only", as the gateway refuses it (`policy_result`). For a
    decision API whose answer a PEP may read as a plain permit (AuthZEN)."""
    if decision.allowed and refuses_write(
        decision.obligations.read_only, action, resource, context
    ):
        return ChainDecision(
            False, decision.principals, generation=decision.generation, reason=READ_ONLY
        )
    return decision


def plainly_allowed(
    authz: Authorizer,
    principals: Sequence[Entity],
    action: str,
    resource: Entity,
    context: dict | None,
    granted_scopes: Iterable[str],
    task: str = "",
) -> bool:
    """Whether `decide_chain` allows ``action`` on ``resource`` with nothing for the gateway to
    do (`nothing_to_do`). The gateway's check of ``connect`` on every message, which goes
    through the whole contract (`Enforcer.decide`, recorded) when this is False.

    It is that decision, every question of the contract asked: a fast path that asked fewer
    would say yes where one it left out refuses (an obligation that cannot be decided, a rule
    that spends the evaluation budget, a review nobody can give)."""
    if not principals:
        return False
    decision = decide_chain(authz, principals, action, resource, context, granted_scopes, task)
    return nothing_to_do(decision, action, resource, {} if context is None else context)


def nothing_to_do(
    decision: ChainDecision, action: str, resource: Entity, context: Mapping[str, Any]
) -> bool:
    """Whether ``decision`` allows with nothing for the gateway to act on beyond letting the
    message go on, as it acts on ``connect``: every principal allowed, every required signal
    fresh and scope granted, no approval still needed, no review, no rate limit, no sign-in
    age to check (the token's ``auth_time`` is the gateway's to weigh), no write refused under
    a read-only downgrade (``context.passed_through``). What it may carry still: what applies
    to a result (masks, labels: ``connect`` has none), alerts (raised with the decisions the
    gateway records), and what is met (the scopes required, an approval granted). Any other
    obligation, one added to `Obligations` later included, is something to do."""
    if not decision.allowed:
        return False
    o = decision.obligations
    if o.requires_approval and not o.approval_granted:
        return False
    if o.read_only and refuses_write(True, action, resource, context):
        return False
    # Every other field of `Obligations` at its default: nothing asked of the gateway.
    return o == Obligations(
        masks=o.masks,
        required_scopes=o.required_scopes,
        requires_approval=o.requires_approval,
        approval_granted=o.approval_granted,
        read_only=o.read_only,
        alerts=o.alerts,
        labels=o.labels,
    )


class Remembered(Generic[Answer]):
    """A contract question the gateway asks on every message (`plainly_allowed` for its
    ``connect``, `decide_chain` for the message itself), answered from memory while the answer
    cannot have changed.

    An answer depends on the policy and facts in force (their generation), the question (the
    chain, the action, the resource, the token's scopes and task) and what was read of the ``context``
    while answering it: each path a rule read (``context.arguments.field`` alone, not the rest
    of the arguments), and each field the contract itself read whole (`ReadContext`). So an
    answer is kept with those paths and the values found there, and given again only for the
    same generation (none while a fact has expired unpurged), the same question, and a context
    with the same values at those paths (type for type, at every depth). An answer that read
    the time (``context.time``, ``@current_unix_time``, a required signal's age) is never kept;
    nor one that read a view that works out its values when read (``context.behavior``), the
    context whole, or much data (`_plain`). What ``keep`` refuses is never kept. One
    generation is kept at a time, at most `QUESTIONS` questions of it holding at most `SIZE`
    values and characters in all, the newest reading of each. Not thread-safe: for one event
    loop."""

    QUESTIONS = 4096
    # What the kept readings may hold in all: values, and characters of text (`_plain`).
    SIZE = 1 << 20

    def __init__(
        self,
        answer: Callable[
            [Authorizer, Sequence[Entity], str, Entity, dict, frozenset[str], str], Answer
        ],
        keep: Callable[[Answer], bool],
    ) -> None:
        self._answer = answer
        self._keep = keep
        self._generation: int | None = None
        self._known: dict[tuple, tuple[_Reading, Answer]] = {}
        self._size = 0

    def __call__(
        self,
        authz: Authorizer,
        principals: Sequence[Entity],
        action: str,
        resource: Entity,
        context: dict | None,
        granted_scopes: frozenset[str],
        task: str = "",
    ) -> Answer:
        """The answer for ``principals``, ``action``, ``resource`` in ``context`` with the
        token's ``granted_scopes`` (a frozenset: part of the question) and ``task``."""
        # Read before the question is answered: a change meanwhile keeps its answer from ever
        # being given again (it is filed under a generation no longer in force).
        generation = authz.settled_generation()
        question = (tuple(principals), action, resource, granted_scopes, task)
        if context is None:
            context = {}
        if generation is not None and generation == self._generation:
            known = self._known.get(question)
            if known is not None and _agrees(context, known[0]):
                return known[1]
        reading = ReadContext(context)
        answer = self._answer(authz, principals, action, resource, reading, granted_scopes, task)
        if generation is not None and not reading.whole and self._keep(answer):
            paths = reading.paths.union((name,) for name in reading.fields)
            reads = tuple((path, _at(context, path)) for path in paths)
            left = [_PLAIN_ITEMS, _PLAIN_TEXT]
            if not any(_timed(path) for path in paths) and _plain(
                tuple(value for _, value in reads), left
            ):
                size = _PLAIN_ITEMS + _PLAIN_TEXT - left[0] - left[1]
                if (
                    generation != self._generation
                    or len(self._known) >= self.QUESTIONS
                    or self._size + size > self.SIZE
                ):
                    self._generation, self._known, self._size = generation, {}, 0
                # Copied: what the caller's context holds may change after this.
                self._known[question] = (_Reading((p, _copy(v)) for p, v in reads), answer)
                self._size += size
        return answer


def remembered_connects() -> Remembered[bool]:
    """`plainly_allowed` from memory: its "yes" kept ("no" is decided in full anyway)."""
    return Remembered(plainly_allowed, keep=bool)


def remembered_calls() -> Remembered[ChainDecision]:
    """`decide_chain` from memory, for the gateway's decision on each message: an answer that
    allows is kept (a refusal is decided in full again, and explained on the spot)."""
    return Remembered(decide_chain, keep=_allows)


def _allows(decision: ChainDecision) -> bool:
    return decision.allowed


_ABSENT = object()
# Where a path goes through a view that works out its values when read: never kept.
_LIVE = object()
_SCALARS = frozenset({int, float, bool, type(None), datetime})
# Values equal exactly when ``==`` says so, once their types are the same.
_SIMPLE = frozenset({str, int, float, bool, type(None)})


def _at(context: Any, path: tuple) -> Any:
    """What ``path`` holds in ``context``: `_ABSENT` where it holds nothing a policy could read
    (an absent key, or a value that is not an object on the way), `_LIVE` where it goes through
    an object that is not a plain ``dict``."""
    value = context
    for name in path:
        cls = value.__class__
        if cls is not dict:
            return _LIVE if isinstance(value, dict) else _ABSENT
        value = value.get(name, _ABSENT)
        if value is _ABSENT:
            return _ABSENT
    return value


class _Reading:
    """What an answer read of one object of the context (the context itself, or an object in
    it), arranged to be compared with another at once (`_agrees`): ``names``, the fields whose
    values were text, numbers, booleans, null or nothing (`_ABSENT`), with those ``values`` and
    the ``kinds`` (ids of the types) of those values; ``whole``, the fields whose values were
    lists, objects or times, and those values; ``inner``, the objects it read fields of, each a
    reading of its own. ``empty``: it read nothing; ``absent``: nothing was found at any of its
    paths."""

    __slots__ = ("names", "absents", "values", "kinds", "whole", "inner", "empty", "absent")

    def __init__(self, reads: Iterable[tuple[tuple, Any]]) -> None:
        """``reads``: each path read, with the value `_at` found there (a copy of it)."""
        simple: list[tuple[Any, Any]] = []
        whole: list[tuple[Any, Any]] = []
        inner: dict[Any, list[tuple[tuple, Any]]] = {}
        for path, seen in reads:
            name = path[0]
            if len(path) > 1:
                inner.setdefault(name, []).append((path[1:], seen))
            elif seen is _ABSENT or seen.__class__ in _SIMPLE:
                simple.append((name, seen))
            else:
                whole.append((name, seen))
        self.names = tuple(name for name, _ in simple)
        self.absents = (_ABSENT,) * len(simple)
        self.values = tuple(seen for _, seen in simple)
        self.kinds = tuple(id(seen.__class__) for _, seen in simple)
        self.whole = tuple(whole)
        self.inner = tuple((name, _Reading(below)) for name, below in inner.items())
        self.empty = not (simple or whole or inner)
        self.absent = (
            not whole
            and all(seen is _ABSENT for seen in self.values)
            and all(reading.absent for _, reading in self.inner)
        )


def _agrees(context: Any, reading: _Reading) -> bool:
    """Whether ``context`` holds what was read at every path of ``reading``, as `_at` finds it
    and `_equal` compares it: this runs on every message, twice, so the text, numbers and
    absences of one object are compared at once, their types by identity (``true`` is not
    ``1``), and each object read into is looked up once."""
    if context.__class__ is not dict:
        # Every path through it goes through a view that works out its values when read
        # (`_LIVE`, never kept), or holds nothing (`_ABSENT`).
        return reading.empty if isinstance(context, dict) else reading.absent
    names = reading.names
    if names:
        found = tuple(map(context.get, names, reading.absents))
        if tuple(map(id, map(type, found))) != reading.kinds or found != reading.values:
            return False
    for name, seen in reading.whole:
        if not _equal(context.get(name, _ABSENT), seen):
            return False
    for name, inner in reading.inner:  # noqa: SIM110 - no generator: this runs on every message
        if not _agrees(context.get(name, _ABSENT), inner):
            return False
    return True


def _copy(value: Any) -> Any:
    """A copy of `_plain` data, its lists and objects copied at every depth."""
    cls = value.__class__
    if cls is dict:
        return {k: _copy(v) for k, v in value.items()}
    if cls is list:
        return [_copy(v) for v in value]
    if cls is tuple:
        return tuple(_copy(v) for v in value)
    return value


def _timed(path: tuple) -> bool:
    """Whether reading ``path`` reads the time: ``context.time`` (the time now when the context
    gives none) or a built-in constant (``@current_unix_time``)."""
    head = path[0]
    return head == "time" or (head.__class__ is str and head[:1] == "@")


# What one remembered answer may hold of the context: values, and characters of text in all.
_PLAIN_ITEMS = 256
_PLAIN_TEXT = 4096


def _plain(value: Any, left: list[int]) -> bool:
    """Whether ``value`` is data that equals another exactly when a policy sees the same in
    both: text, numbers, times, and lists and objects of them (not a view that works out its
    values when read, such as ``context.behavior``), of at most ``left[0]`` values and
    ``left[1]`` characters of text in all (each counted down)."""
    left[0] -= 1
    if left[0] < 0:
        return False
    cls = value.__class__
    if cls is str:
        left[1] -= len(value)
        return left[1] >= 0
    if cls in _SCALARS or value is _ABSENT:
        return True
    if cls is dict:
        return all(
            k.__class__ is str and _plain(k, left) and _plain(v, left) for k, v in value.items()
        )
    if cls is list or cls is tuple:
        return all(_plain(v, left) for v in value)
    return False


def _equal(value: Any, seen: Any) -> bool:
    """Whether ``value`` is ``seen`` (`_plain` data) down to the type of every value in it:
    ``true`` is not ``1``, nor ``1`` ``1.0``, at any depth."""
    cls = seen.__class__
    if value.__class__ is not cls:
        return False
    if cls is dict:
        return len(value) == len(seen) and all(
            k in value and _equal(value[k], v) for k, v in seen.items()
        )
    if cls is list or cls is tuple:
        return len(value) == len(seen) and all(map(_equal, value, seen))
    return value == seen


def same_value(value: Any, seen: Any) -> bool:
    """Whether a context value read now is the one read before (of the same type, and equal)."""
    return value is seen or (type(value) is type(seen) and value == seen)


# How a token exchange (RFC 8693, `bastion.oauth.token_exchange`) is named in its context
# (``context.method``) and in its decision record: the method, and the action asked of the
# policy (``may_delegate``, then ``delegated_scope`` for each scope).
DELEGATION_METHOD = "token/exchange"
DELEGATION_ACTION = "delegate"
# The reasons the policy refuses an exchange with (`DelegationDecision.refusal`).
DELEGATION_REFUSALS = frozenset({"not_permitted", EvaluationLimit.reason, "no_scope_delegated"})


@dataclass(frozen=True, slots=True)
class DelegationDecision:
    """The policy's answer to a token exchange: whether ``from`` may delegate to ``to`` at all,
    and the scopes of those asked for that survive; with ``explained``, the rules that proved
    it (``may_delegate``'s, then each surviving scope's ``delegated_scope``)."""

    allowed: bool
    scopes: tuple[str, ...] = ()
    reason: str | None = None  # "evaluation_limit" when the budget ran out (refused)
    rules: tuple[str, ...] = ()

    @property
    def refusal(self) -> str | None:
        """Why the exchange is refused on this answer, as its decision record says it
        (``not_permitted``, ``evaluation_limit``, ``no_scope_delegated``); None when it passes
        with `scopes`."""
        if not self.allowed:
            return self.reason or "not_permitted"
        return None if self.scopes else "no_scope_delegated"


def decide_exchange(
    authz: Authorizer,
    chain: Sequence[Entity],
    server: Entity,
    scopes: Iterable[str],
    context: dict | None = None,
    explained: bool = False,
) -> DelegationDecision:
    """The policy's question of a token exchange, as the token endpoint asks it and `bastion
    audit replay` asks its record again: ``chain`` is the principals the record names (the
    user, each agent of the subject token's chain, then the sub-agent); the last agent before
    the sub-agent delegates to it, for the user, on ``server`` (`decide_delegation`)."""
    if len(chain) < 3:
        raise ValueError(f"a delegation's chain is a user and two agents at least: {chain}")
    return decide_delegation(
        authz, chain[0], chain[-2], chain[-1], server, scopes, context, explained
    )


def decide_delegation(
    authz: Authorizer,
    user: Entity,
    from_agent: Entity,
    to_agent: Entity,
    server: Entity,
    scopes: Iterable[str],
    context: dict | None = None,
    explained: bool = False,
) -> DelegationDecision:
    """Ask ``may_delegate(from_agent, to_agent, server)`` and, for each of ``scopes``,
    ``delegated_scope(user, from_agent, to_agent, server, scope)``, in one session (one view
    of the facts). Refused (fail closed) when the evaluation spends its budget. ``explained``:
    the rules that proved what held, worked out in that same session (a refusal has none:
    no rule let it through), for its decision record."""
    rules: list[str] = []
    try:
        with authz.session(context) as s:
            if not s.rows("may_delegate", "bbb", from_agent, to_agent, server):
                return DelegationDecision(False)
            passed = tuple(
                scope
                for scope in scopes
                if s.rows("delegated_scope", "bbbbb", user, from_agent, to_agent, server, scope)
            )
            if explained:
                proofs = [s.prove("may_delegate", from_agent, to_agent, server)]
                proofs += (
                    s.prove("delegated_scope", user, from_agent, to_agent, server, scope)
                    for scope in passed
                )
                for proof in proofs:
                    rules += (rule for rule in proof.rules() if rule not in rules)
    except EvaluationLimit as limit:
        return DelegationDecision(False, reason=limit.reason)
    return DelegationDecision(True, passed, rules=tuple(rules))


def _decision_time(context: dict | None) -> float:
    at = context.get("time") if context else None
    return at.timestamp() if isinstance(at, datetime) else time.time()


# JSON as an ``approval_grant``'s agent spells it: no spaces.
_TIGHT = (",", ":")


def approval_grant_agent(agents: Sequence[str], task: str = "") -> Entity:
    """The agent an ``approval_grant`` fact names for a call through ``agents`` (first to
    calling) under the token's ``task`` ("" for none): under no task, the agent itself for a
    direct grant (one agent), else the whole chain as the JSON list of its client ids
    (``Agent{"[\\"coder\\",\\"icons\\"]"}``); under a task, a JSON object of the chain and the
    task (``Agent{"{\\"agents\\":[\\"coder\\"],\\"task\\":\\"t-1\\"}"}``). A grant for minutes is
    bound to the chain and task of the held call, as a single-use approval is: a sub-agent's grant
    working for one agent counts neither for its direct calls nor working for another, an agent's
    grant for its direct calls never covers it as a sub-agent, and a grant given under one task
    counts under no other, nor under none (nor one given under none under a task). bastion's client
    ids never start with ``[`` or ``{`` (a uuid, an https URL); an agent a trusted issuer names so
    is written as a list of one, so no chain or task's grant reads as one agent, nor one agent as
    either."""
    if task:
        return Entity(
            "Agent", json.dumps({"agents": list(agents), "task": task}, separators=_TIGHT)
        )
    if len(agents) == 1 and not agents[0].startswith(("[", "{")):
        return Entity("Agent", agents[0])
    return Entity("Agent", json.dumps(list(agents), separators=_TIGHT))


def _approval_granted(
    s: Any, chain: tuple[Entity, ...], action: str, resource: Entity, task: str
) -> bool:
    """Whether a live ``approval_grant`` covers this call: one for the user, this chain of
    agents and this task (`approval_grant_agent`), whose call the approval held and granted."""
    if len(chain) < 2:
        return False
    agent = approval_grant_agent(tuple(p.id for p in chain[1:]), task)
    return bool(s.rows("approval_grant", "bbbb", chain[0], agent, action, resource))


# What `requires_signal` is asked about for a call that names no device (`call_device`): no
# signal counts for it, so each requirement that holds for it is stale.
NO_DEVICE = Entity("Device", "")


def call_device(context: Mapping[str, Any] | None) -> Entity:
    """The device of the call as `requires_signal` asks about it: ``Device{context.device.id}``,
    or `NO_DEVICE` when the context names none (no ``device``, or an ``id`` that is not a
    non-empty string). Reads ``context.device`` whole, so a remembered answer (`Remembered`) is
    given again only for the same device."""
    device = context.get("device") if context else None
    found = device.get("id") if isinstance(device, dict) else None
    return Entity("Device", found) if type(found) is str and found else NO_DEVICE


def _stale_signals(s: Any, chain: tuple[Entity, ...], context: dict | None) -> tuple | None:
    """The first principal of the chain, else the call's device (`call_device`, asked only when
    a ``requires_signal`` rule names a ``Device``), missing a fresh required signal, and
    the names it misses; None when every required signal is fresh. The decision's time is read
    only if a signal is required (`Remembered` keeps answers that did not read it)."""
    clock: list[float] = []
    for principal in chain:
        stale = _stale_of(s, principal, context, clock)
        if stale:
            return principal, stale
    if s.device_signals:
        device = call_device(context)
        stale = _stale_of(s, device, context, clock)
        if stale:
            return device, stale
    return None


def _stale_of(s: Any, subject: Entity, context: dict | None, clock: list[float]) -> tuple:
    """The names of the signals ``requires_signal`` asks of ``subject`` that it lacks fresh.
    ``clock`` holds the decision's time once read. `NO_DEVICE` lacks every one it is asked."""
    stale = []
    for name, max_age in sorted(s.rows("requires_signal", "bff", subject), key=repr):
        if not isinstance(name, str) or type(max_age) is not int or max_age < 0:
            stale.append(str(name))  # a requirement that cannot be checked is not met
            continue
        if subject is NO_DEVICE:
            stale.append(name)  # never a signal of a device nobody named
            continue
        if not clock:
            clock.append(_decision_time(context))
        now = clock[0]
        fresh = any(
            type(set_at) is int and now - set_at <= max_age
            for _value, _source, set_at in s.rows("signal", "bbfff", subject, name)
        )
        if not fresh:
            stale.append(name)
    return tuple(stale)


# The alert a principal's ``alert`` rules raise when what they raise cannot be named.
UNDECIDED_ALERT = "alert_undecided"


def _alerts(s, chain: tuple[Entity, ...]) -> tuple[tuple[Entity, str, str], ...]:
    """Every ``alert(actor, name, severity)`` that holds for a principal of the chain."""
    found: list[tuple[Entity, str, str]] = []
    for principal in chain:
        try:
            raised = s.rows("alert", "bff", principal)
        except UndecidedQuestion:
            # Alerts never change the answer: a rule whose alerts cannot be named (arithmetic
            # with no result, bound or passed on) raises one saying so, of the highest severity.
            raised = {(UNDECIDED_ALERT, "critical")}
        for name, severity in sorted(raised, key=repr):
            found.append(
                (
                    principal,
                    name if isinstance(name, str) else repr(name),
                    severity if isinstance(severity, str) else repr(severity),
                )
            )
    return tuple(found)


# ``items[0]``, ``items[*]``: JSONPath's spellings of ``items.0``, ``items.*``.
_INDEX = re.compile(r"\[(\*|\d+)\]")


def path_keys(path: str) -> tuple[str, ...] | None:
    """The keys of a ``mask`` path (dot-separated keys, ``*`` for every element of a list or key
    of an object; ``$.customers[*].email`` is ``customers.*.email``), or None where it cannot be
    read: empty, ``$``, ``$..x``, a quoted key, an empty key (`bastion.gateway.masks` then
    withholds every JSON value of the result whole)."""
    keys = tuple(_INDEX.sub(r".\1", path).removeprefix("$").removeprefix(".").split("."))
    if any(not key or "[" in key or "]" in key for key in keys):
        return None
    return keys
