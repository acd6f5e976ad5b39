"""Replaying decision records with a candidate policy (``bastion audit replay``): which of the
gateway's real decisions would pushing it change?

Each record is asked again as the question it asked (`question_of`): its principals, its
action (`bastion.decide.mcp.recorded_action`), its target, its token's scopes and its context,
with the time it was recorded at as ``context.time``, so that a time-window rule answers as at
the call. It is decided by the gateway's own contract (`decide_chain`, `policy_result`) on the
facts the `Authorizer` holds: the store's as they are now, for facts keep no history. What the
policy alone did not decide is never guessed at: `NotReplayable` says why (`NOT_REPLAYABLE`).
Each is decided too by the policy in force today (`in_force`): what the candidate decides
otherwise than it, the push changes (`InForce.changed_by`), whatever the record says. A record
both decide alike, otherwise than recorded, is decided again by the policy in force when it was
recorded, on the same facts (`cause_of`): the facts changed since, or a push since did.

A token exchange's record (RFC 8693, `bastion.oauth.token_exchange`) is asked again as the token
endpoint asked it, by the same function (`decide_exchange`): ``may_delegate`` and
``delegated_scope`` for its chain, on its MCP server, for the scopes it asked, with its recorded
context. Its answer is its result and the scopes that pass: an allow that lets other scopes pass
now is decided otherwise.

A decision of the decision service stored in ``decision_log`` (``decision_log = "database"``,
`bastion.audit.decision_log`), read as a `LoggedDecision`, is asked again as the API it names
asked it (`Question` ``service``), by that API's own decision function: ``/v1/authorize``, one
actor, the policy's ``allow`` alone, and a chain of principals, the contract's answer
(`decide_chain`) with the scopes it was given; AuthZEN's evaluation, `bastion.pdp.authzen.decide`
on the evaluation it kept (its answer's ``decision``: an approval required, a scope missing or a
write under the read-only downgrade refuse); Oso Cloud's ``authorize``,
`bastion.pdp.oso_cloud.authorize` on its values. Each check of a batch is a row of its own. Its
context is the one it kept, with the time it was decided at as ``context.time`` where the caller
gave none. Only checks are replayed: a list, actions or query is counted (``not_a_check``), and
so is a check whose context was not kept, and a row from before rows named their API that
another API than ``/v1`` may have asked and decided otherwise (`api_of`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, NamedTuple

from bastion.audit.decisions import DecisionRecord
from bastion.decide import Authorizer
from bastion.decide.contract import (
    DELEGATION_ACTION,
    DELEGATION_METHOD,
    DELEGATION_REFUSALS,
    ChainDecision,
    decide_chain,
    decide_exchange,
    explained_principal,
    policy_result,
)
from bastion.decide.mcp import CLIENT_REQUESTS, recorded_action
from bastion.delegation.labels import CONTEXT_FIELD
from bastion.facts.model import Entity, arg_from_json
from bastion.pdp import authzen, oso_cloud
from bastion.policy.errors import EvaluationLimit
from bastion.policy.runtime import ReadContext

# Why a record is not replayed, each counted on its own.
NOT_REPLAYABLE = {
    "later_format": "written by a later bastion, with fields this one does not know",
    "recovered": "recovered from the journal of a process that died: no context, no outcome",
    "exchange_refused_before_policy": "a token exchange refused before the policy was asked"
    " (a bad actor token, may_act, the depth, scopes beyond the subject token's...)",
    "exchange_not_recorded": "a token exchange's record without the scopes it asked for or"
    " those that passed",
    "no_context": "its context, or the time in it, was not recorded",
    "facts_stale": "refused because the facts were too old to decide on",
    "refused_before_decision": "refused before any policy was asked (a tool or prompt not as"
    " pinned)",
    "suspended": "refused by the kill switch (a suspended agent, user or session), before the"
    " policy was asked or when what it let through was to be held for people",
    "rate_limit": "decided by a rate limit's counters",
    "approval": "decided by what people answered (an approval or a review given, refused or"
    " in use; the review of a run an approval let through) or by the approval store, once the"
    " policy had asked for them",
    "session_labels": "decided by the session label store",
    "not_decided_by_policy": "its result or reason is not the policy's alone",
    "action_not_recorded": "written before records named their action, and another action"
    " than the usual one may have been asked",
    "unreadable": "its principals or target cannot be read as entities",
    "arguments_not_recorded": "the candidate reads the call's arguments, which records keep"
    " only as a digest",
    "context_not_recorded": "the candidate reads behaviour figures or session labels that were"
    " not worked out (so not recorded) at the call",
    "not_a_check": "a list, actions or query of the decision service: only its checks"
    " (authorize) are replayed",
    "context_not_kept": "a decision service check whose context was over 64 KiB, so not kept",
    "context_facts_not_kept": "a decision service check asked with Oso Cloud context facts,"
    " which are not kept",
    "api_not_recorded": "a decision service check stored before rows named the API that asked"
    " it, which AuthZEN's or Oso Cloud's API may have asked and decided otherwise than /v1",
}
# The APIs of the decision service (`bastion.server.api.decisions.DecisionRecord.api`).
_V1, _AUTHZEN, _OSO_CLOUD = "v1", "authzen", "oso_cloud"
# The results the policy alone gives, and the refusals' reasons it gives them with.
_POLICY_RESULTS = frozenset({"allow", "deny", "step_up"})
_POLICY_REFUSALS = frozenset({"not_permitted", "evaluation_limit", "signal_stale", "read_only"})
_APPROVAL_REASONS = frozenset(
    {
        "no_approver",
        "approval_limit",
        "approval_unavailable",
        "approval_used",
        "approval_in_progress",
    }
)
# A call held for a person nobody has answered yet: the hold is the policy's (its
# ``requires_approval`` or ``requires_review``), replayed as the policy's (`_held`).
_HELD_BY_POLICY = frozenset({"approval_pending", "review_pending"})
# Refused because the policy would hold it for a person, where the gateway holds nothing (what
# it sends a client unasked, a listen filter's resource, an upstream's request to the client):
# the policy's too, its hold replayed as that refusal (`Question.refuses_holds`).
_HOLD_REFUSALS = frozenset({"requires_approval", "requires_review", "review_required"})
_LABEL_REASONS = frozenset({"labels_unavailable", "labels_lost", "labels_full"})
# Context fields the gateway works out only where a rule reads them: what the policy in force
# then did not read is not in the record, and a candidate's answer on it would be a guess.
_WORKED_OUT = frozenset({"behavior", CONTEXT_FIELD})
_ABSENT = object()
# Why the cause of a difference the push does not make cannot be told (`Cause` ``unknown``),
# said with the record's policy version.
UNKNOWN_CAUSE = {
    "no_version": "the record names no policy version",
    "version_not_held": "policy version {version} is not held any more",
    "version_not_loaded": "policy version {version} does not load here",
    "not_replayable": "policy version {version}, in force then, reads what the record does not"
    " hold",
    "over_budget": "policy version {version}, in force then, goes over the evaluation budget today",
}
# Why the policy in force today gives no answer to a record (`InForce` ``why``), said with its
# name: what the push does to such a record is unknown, and counted as a change.
UNKNOWN_EFFECT = {
    "not_replayable": "{policy}, in force, reads what the record does not hold",
    "over_budget": "{policy}, in force, goes over the evaluation budget where the candidate"
    " does not",
}


class NotReplayable(Exception):  # noqa: N818 - an answer, not a failure
    """A record that is not replayed; ``reason`` is a key of `NOT_REPLAYABLE`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(NOT_REPLAYABLE[reason] + (f": {detail}" if detail else ""))
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Question:
    """What a decision record asked the policy, as the gateway asked it."""

    principals: tuple[Entity, ...]
    action: str
    resource: Entity
    context: dict[str, Any]
    scopes: frozenset[str]
    auth_time: int | None
    at: float
    # A token exchange's: the scopes it asked to pass, in the order asked. None for a call.
    requested: tuple[str, ...] | None = None
    # A decision service check's (`LoggedDecision`), asked as its API asked it: "v1", one actor
    # asked of the policy's allow alone; "v1_chain", the contract's answer for its principals,
    # held to ``scopes`` only where it was given some (``service_scopes``); "authzen", AuthZEN's
    # answer, held to ``scopes`` (its context's); "oso_cloud", Oso Cloud's authorize of its
    # values. None for the gateway's and an exchange's.
    service: str | None = None
    service_scopes: frozenset[str] | None = None
    # Whether a field the API works out beside the caller's context (Oso Cloud's behaviour
    # figures, `_WORKED_OUT`) may have been given to the policy without being kept.
    worked_out: bool = False
    # A gateway's message that is refused where the policy would hold it for a person (nobody
    # waits on it: a notification, a listen filter's resource, an upstream's request to the
    # client): a hold is replayed as that refusal (`_held`).
    refuses_holds: bool = False
    # The task the gateway's caller's token was for ("" for none): an approval for minutes
    # counts only under the task it was given under (`approval_grant_agent`).
    task: str = ""


@dataclass(frozen=True, slots=True)
class LoggedDecision:
    """A decision of the decision service stored in ``decision_log``, as replay reads it: named
    as a gateway record's fields are where the report reads them (``method`` is its kind,
    ``target`` and ``principals`` its entities spelled as `Entity.__repr__` spells them).
    ``api``: the API that asked it (``v1``, ``authzen``, ``oso_cloud``), None in a row stored
    before rows named it."""

    id: str
    at: float
    kind: str
    request: dict[str, Any]
    result: str
    reason: str
    policy_version: int | None
    api: str | None = None
    server: str = ""
    rules: tuple[str, ...] = ()

    @classmethod
    def of(cls, fields: tuple) -> LoggedDecision:
        """From the fields of a stored `bastion.server.api.decisions.DecisionRecord`."""
        id_, kind, request, result, _seq, policy_version, at, _explanation, refusal, _by, api = (
            fields
        )
        reason = refusal.get("reason") if isinstance(refusal, dict) else None
        return cls(
            id_,
            at,
            kind,
            request if isinstance(request, dict) else {},
            ("allow" if result else "deny") if isinstance(result, bool) else str(result),
            reason if isinstance(reason, str) else "",
            policy_version,
            api if isinstance(api, str) else None,
        )

    @property
    def method(self) -> str:
        return self.kind

    @property
    def context(self) -> dict[str, Any]:
        context = self.request.get("context")
        return context if isinstance(context, dict) else {}

    @property
    def principals(self) -> tuple[str, ...]:
        asked = self.request.get("principals", [self.request.get("actor")])
        return tuple(map(self._spelled, asked)) if isinstance(asked, list) else ()

    @property
    def target(self) -> str:
        return self._spelled(self.request.get("resource"))

    def _spelled(self, value: Any) -> str:
        """An entity of the stored request (``{"type", "id"}``) as `Entity.__repr__` spells
        it; an Oso Cloud String, Integer or Boolean as JSON spells it."""
        try:
            read = _oso_value(value) if self.api == _OSO_CLOUD else _entity_of(value)
        except (TypeError, ValueError):
            return str(value)
        return repr(read) if isinstance(read, Entity) else json.dumps(read)


def _entity_of(value: Any) -> Entity:
    """An entity as the decision service's requests give it, ``{"type": ..., "id": ...}``, read
    as facts read it (`arg_from_json`); `ValueError` for anything else."""
    if not isinstance(value, dict):
        raise ValueError(f"not an entity: {value!r}")
    return arg_from_json(value)


def _oso_value(value: Any) -> Any:
    """A value as Oso Cloud's API keeps it (`bastion.pdp.oso_cloud.value_to_oso`), read back;
    `ValueError` for anything else."""
    if not isinstance(value, dict) or set(value) != {"type", "id"}:
        raise ValueError(f"not an Oso Cloud value: {value!r}")
    type_, id_ = value["type"], value["id"]
    if not isinstance(type_, str) or not type_ or not isinstance(id_, str):
        raise ValueError(f"not an Oso Cloud value: {value!r}")
    return oso_cloud.value_of(type_, id_)


Recorded = DecisionRecord | LoggedDecision


@dataclass(frozen=True, slots=True)
class Replayed:
    """A record decided again: the candidate's result and reason; when it differs from the
    record's (or `explained`), the rules that decided it (empty over budget: explaining would
    spend it again). A token exchange's: the scopes that pass, and always the rules that proved
    them (worked out with its answer, as the token endpoint records them)."""

    record: Recorded
    question: Question
    result: str
    reason: str
    rules: tuple[str, ...] = ()
    chain: ChainDecision | None = field(default=None, repr=False, compare=False)
    # A token exchange's: the scopes the candidate lets pass (none when refused).
    scopes: tuple[str, ...] | None = None

    @property
    def same(self) -> bool:
        return _outcome(self.result, self.scopes) == _outcome(
            self.record.result, granted(self.record)
        )

    @property
    def over_budget(self) -> bool:
        return self.reason == EvaluationLimit.reason


def question_of(record: Recorded) -> Question:
    """The question ``record`` asked, or `NotReplayable` when the policy alone did not answer
    it, or what it asked cannot be told."""
    if isinstance(record, LoggedDecision):
        return _service_question(record)
    if record.later_fields():
        raise NotReplayable("later_format")
    if record.recovered:
        raise NotReplayable("recovered")
    if record.reason == "facts_stale":
        raise NotReplayable("facts_stale")
    if record.method == DELEGATION_METHOD:
        return _exchange_question(record)
    if record.reason == "suspended":
        # Wherever it found the suspension: at the door, or at the hold the policy asked for.
        raise NotReplayable("suspended")
    if not record.deciding_principal:  # only the refusals made before any policy name none
        raise NotReplayable("refused_before_decision")
    reason = record.reason
    if record.result == "rate_limited" or reason == "rate_limit_unavailable":
        raise NotReplayable("rate_limit")
    obligations = record.obligations if isinstance(record.obligations, dict) else {}
    approval = obligations.get("approval")
    # A review holding the result of a run a person's approval let through is there because
    # that person approved (`approval_id`: the approval the run used), not for the policy.
    held_by_policy = (
        record.result == "held"
        and reason in _HELD_BY_POLICY
        and not (isinstance(approval, dict) and approval.get("approval_id"))
    )
    refuses_holds = record.result == "deny" and reason in _HOLD_REFUSALS
    if not (held_by_policy or refuses_holds) and (
        record.result == "held" or reason in _APPROVAL_REASONS or approval
    ):
        raise NotReplayable("approval")  # a person's answer, or the store's, decided it
    if reason in _LABEL_REASONS:
        raise NotReplayable("session_labels")
    if not (held_by_policy or refuses_holds) and (
        record.result not in _POLICY_RESULTS
        or (record.result == "deny" and reason not in _POLICY_REFUSALS)
    ):
        raise NotReplayable("not_decided_by_policy")
    context = _context_at(record)
    principals, resource = _parties(record)
    action = recorded_action(record.method, resource, record.action)
    if action is None or not principals:
        raise NotReplayable("action_not_recorded" if principals else "unreadable")
    scopes = context.get("scopes")
    token = context.get("token")
    auth_time = token.get("auth_time") if isinstance(token, dict) else None
    return Question(
        principals,
        action,
        resource,
        context,
        frozenset(s for s in scopes if isinstance(s, str))
        if isinstance(scopes, list)
        else frozenset(),
        auth_time if type(auth_time) is int else None,
        record.at,
        refuses_holds=refuses_holds or _unheld(record.method),
        task=record.task,
    )


def _unheld(method: str) -> bool:
    """Whether the gateway holds nothing of a message of ``method`` for a person: a stream's
    notification, and an upstream's request to a client and the ``connect`` it reaches the
    client under, which are recorded under its method (nobody waits on them)."""
    return method.startswith("notifications/") or method in CLIENT_REQUESTS


def _service_question(record: LoggedDecision) -> Question:
    """The question a decision service check asked, as the API it names asked it (each check
    of a batch is a row of its own, with the context it was decided in); `NotReplayable` for a
    list, actions or query, a check refused by the kill switch, one whose context is not kept,
    or one whose API cannot be told (`api_of`). Its time is the one it was decided at, where its
    context gave none."""
    if record.kind != "authorize":
        raise NotReplayable("not_a_check", record.kind)
    request = record.request
    if request.get("context_omitted"):
        raise NotReplayable("context_not_kept")
    if request.get("context_facts"):
        raise NotReplayable("context_facts_not_kept")
    if record.reason == "suspended":
        raise NotReplayable("suspended")
    if record.result not in ("allow", "deny"):
        raise NotReplayable("not_decided_by_policy")
    api, worked_out = api_of(record)
    context = dict(record.context)
    context.setdefault("time", datetime.fromtimestamp(record.at, UTC))
    chained = api == _V1 and "principals" in request
    scopes: frozenset[str] | None = None
    try:
        if api == _AUTHZEN:
            if not isinstance(request.get("context"), dict):  # AuthZEN's always has one
                raise ValueError("no context")
            asked = authzen.Evaluation.recorded(request, context)
            principals, resource, action = (asked.subject,), asked.resource, asked.action
            scopes = asked.scopes
        else:
            read = _oso_value if api == _OSO_CLOUD else _entity_of
            parties = request["principals"] if chained else [request["actor"]]
            principals = tuple(map(read, parties))
            resource, action = read(request["resource"]), request["action"]
            given = request.get("scopes")
            if chained and _texts(given):
                scopes = frozenset(given)
    except (KeyError, TypeError, ValueError):  # AuthzenError is a ValueError
        raise NotReplayable("unreadable") from None
    if not principals or not isinstance(action, str):
        raise NotReplayable("unreadable")
    return Question(
        principals,
        action,
        resource,
        context,
        scopes or frozenset(),
        None,
        record.at,
        service="v1_chain" if chained else api,
        service_scopes=scopes,
        worked_out=worked_out,
    )


def api_of(record: LoggedDecision) -> tuple[str, bool]:
    """The API that asked a stored check, and whether it may have given the policy a field it
    worked out and did not keep (`Question.worked_out`). A row stored before rows named it is
    told by what only one API keeps: a chain, or a context without the subject's, resource's
    and action's properties that AuthZEN keeps in every one, are /v1's; with no context, /v1's
    or Oso Cloud's, which decide it alike where both parties are entities (asked as /v1's,
    the behaviour figures Oso Cloud works out not kept). `NotReplayable` (``api_not_recorded``)
    for the others: a context shaped as AuthZEN's, an Oso Cloud String, Integer or Boolean."""
    if record.api is not None:
        if record.api not in (_V1, _AUTHZEN, _OSO_CLOUD):
            raise NotReplayable("later_format", f"asked through {record.api!r}")
        return record.api, record.api == _OSO_CLOUD
    request = record.request
    if "principals" in request:
        return _V1, False
    context = request.get("context")
    if isinstance(context, dict):
        if all(isinstance(context.get(name), dict) for name in authzen.RESERVED_CONTEXT):
            raise NotReplayable("api_not_recorded", "its context is shaped as AuthZEN's")
        return _V1, False
    parties = (request.get("actor"), request.get("resource"))
    if any(isinstance(p, dict) and p.get("type") in oso_cloud.VALUE_TYPES for p in parties):
        raise NotReplayable("api_not_recorded", "an Oso Cloud value, or an entity of /v1")
    return _V1, True


def _exchange_question(record: DecisionRecord) -> Question:
    """The question a token exchange's record asked (`decide_exchange`): its chain, its MCP
    server, the scopes it asked for and its context. Not replayable when it was refused before
    the policy was asked (its reason says why), or otherwise than by the policy."""
    if not record.deciding_principal:  # the endpoint names one once it asked the policy
        raise NotReplayable("exchange_refused_before_policy", record.reason)
    if (record.result, record.reason) != ("allow", "") and (
        record.result != "deny" or record.reason not in DELEGATION_REFUSALS
    ):
        raise NotReplayable("not_decided_by_policy")  # the kill switch, a task, a revoked grant
    context = _context_at(record)
    principals, server = _parties(record)
    if len(principals) < 3 or server.type != "McpServer":
        raise NotReplayable("unreadable")
    requested = context.get("requested_scopes")
    if not _texts(requested) or granted(record) is None:
        raise NotReplayable("exchange_not_recorded")
    scopes = context.get("scopes")
    return Question(
        principals,
        DELEGATION_ACTION,
        server,
        context,
        frozenset(scopes) if _texts(scopes) else frozenset(),
        None,
        record.at,
        tuple(requested),
    )


def granted(record: Recorded) -> tuple[str, ...] | None:
    """The scopes a token exchange's record let pass (none when refused); None for a call's
    record, or an exchange's that does not say."""
    if record.method != DELEGATION_METHOD or not isinstance(record, DecisionRecord):
        return None
    if not isinstance(record.obligations, dict):
        return None
    scopes = record.obligations.get("scopes")
    return tuple(scopes) if _texts(scopes) else None


def _texts(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _outcome(result: str | None, scopes: tuple[str, ...] | None) -> tuple:
    """What is compared of two answers: the result, and a token exchange's scopes that pass
    (a set: the order asked is the record's)."""
    return result, frozenset(scopes) if scopes is not None else None


def _context_at(record: DecisionRecord) -> dict[str, Any]:
    """``record``'s context with its time as the gateway and the token endpoint gave it: an
    aware datetime; `NotReplayable` without it."""
    if not isinstance(record.context, dict):
        raise NotReplayable("no_context")
    context = dict(record.context)
    try:
        context["time"] = datetime.fromisoformat(context.get("time"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise NotReplayable("no_context") from None
    if context["time"].tzinfo is None:
        raise NotReplayable("no_context")
    return context


def _parties(record: DecisionRecord) -> tuple[tuple[Entity, ...], Entity]:
    """The principals and the target a gateway record names (a token exchange's: its MCP
    server); not replayable (``unreadable``) where either is not spelt as bastion spells them."""
    try:
        return tuple(map(_entity, record.principals)), _entity(record.target)
    except (AttributeError, TypeError, ValueError):
        raise NotReplayable("unreadable") from None


def _entity(text: str) -> Entity:
    """The entity a record spells as ``text``; `ValueError` unless it spells it back the same
    (a record not written as `Entity.__repr__` writes it)."""
    entity = Entity.parse(text)
    if repr(entity) != text:
        raise ValueError(f"not read back the same: {text!r}")
    return entity


def replay(authz: Authorizer, record: Recorded) -> Replayed:
    """``record`` decided again by ``authz``'s policy and facts, as the gateway decides: every
    principal of its chain, within one evaluation budget (over it: refused, as the gateway
    refuses). `NotReplayable` when the answer would rest on what the record does not hold."""
    question = question_of(record)
    answer = _decide(authz, question, record.context)
    replayed = Replayed(
        record,
        question,
        answer.result,
        answer.reason,
        answer.rules,
        chain=answer.chain,
        scopes=answer.scopes,
    )
    return replayed if replayed.same else explained(authz, replayed)


def explained(authz: Authorizer, replayed: Replayed) -> Replayed:
    """``replayed`` with the rules of ``authz`` (its candidate) that decided it."""
    if replayed.chain is None:
        return replayed
    rules = _rules(authz, replayed.question, replayed.chain, replayed.result, replayed.reason)
    return replace(replayed, rules=rules)


@dataclass(frozen=True, slots=True)
class InForce:
    """The policy in force today's answer to a replayed record's question: ``result`` and
    ``reason`` (and a token exchange's ``scopes`` that pass), None where it gave none (``why``,
    a key of `UNKNOWN_EFFECT`)."""

    result: str | None = None
    reason: str | None = None
    why: str | None = None
    scopes: tuple[str, ...] | None = None

    def changed_by(self, replayed: Replayed) -> bool | None:
        """Whether pushing the candidate changes ``replayed``'s decision: it decides another
        result, or goes over the budget where the policy in force does not; None where the
        policy in force gave no answer (the push's effect unknown)."""
        if self.why is not None:
            return None
        if replayed.over_budget:
            return self.reason != EvaluationLimit.reason
        return _outcome(self.result, self.scopes) != _outcome(replayed.result, replayed.scopes)


def in_force(replayed: Replayed, now: Authorizer) -> InForce:
    """``replayed``'s question decided by ``now``, the policy in force today, on the facts and
    within the budget the candidate had. Over the budget where the candidate is not, its answer
    is not told: the push may change it or not. Over it both: alike (the gateway refuses it
    before the push and after)."""
    try:
        answer = _decide(now, replayed.question, replayed.record.context)
    except NotReplayable:
        return InForce(why="not_replayable")
    result, reason = answer.result, answer.reason
    if reason == EvaluationLimit.reason and not replayed.over_budget:
        return InForce(result, reason, "over_budget")
    return InForce(result, reason, scopes=answer.scopes)


@dataclass(frozen=True, slots=True)
class Cause:
    """Why a record is listed: ``policy``, the push changes it (the candidate decides it
    otherwise than the policy in force), or ``unknown`` where that cannot be told (`InForce`
    ``why``). Of a record the push does not change, why it is decided otherwise than recorded
    (`cause_of`): ``facts``, the facts changed since (the policy in force when it was recorded
    decides it so today too); ``earlier_push``, a policy pushed since (that policy still decides
    it otherwise); or ``unknown`` (``why``, a key of `UNKNOWN_CAUSE`). ``result`` and
    ``reason`` (and a token exchange's ``scopes``): the policy of the time's answer today, None
    where it gave none or was not asked."""

    name: str
    result: str | None = None
    reason: str | None = None
    why: str | None = None
    scopes: tuple[str, ...] | None = None


def cause_of(replayed: Replayed, then: Authorizer) -> Cause:
    """Why ``replayed``, decided as the policy in force today decides it but otherwise than its
    record, is: its question decided again by ``then``, the policy in force when it was
    recorded, on the facts and within the budget the candidate had. Decided as today: the
    facts' doing. Otherwise (as recorded, or some third way; or over the budget today only): a
    policy pushed since. Over the budget then: not told (the facts may have grown, the budget
    shrunk)."""
    try:
        answer = _decide(then, replayed.question, replayed.record.context)
    except NotReplayable:
        return Cause("unknown", why="not_replayable")
    result, reason, scopes = answer.result, answer.reason, answer.scopes
    if reason == EvaluationLimit.reason:
        return Cause("unknown", result, reason, "over_budget")
    if replayed.over_budget or _outcome(result, scopes) != _outcome(
        replayed.result, replayed.scopes
    ):
        return Cause("earlier_push", result, reason, scopes=scopes)
    return Cause("facts", result, reason, scopes=scopes)


class _Answer(NamedTuple):
    """A policy's answer to a record's question: the result and its reason; a call's chain
    decision, or a token exchange's scopes that pass and the rules that proved them."""

    result: str
    reason: str
    chain: ChainDecision | None = None
    scopes: tuple[str, ...] | None = None
    rules: tuple[str, ...] = ()


def _decide(authz: Authorizer, question: Question, recorded: dict[str, Any]) -> _Answer:
    """``question`` decided by ``authz`` as the gateway (or, for a token exchange, the token
    endpoint) decides it; `NotReplayable` if it read what ``recorded`` (the record's context)
    cannot tell. An exchange's context is all the endpoint gave the policy: it reads nothing
    else."""
    if question.requested is not None:
        # Explained in the same session, as the endpoint does where it keeps records.
        decision = decide_exchange(
            authz,
            question.principals,
            question.resource,
            question.requested,
            question.context,
            explained=True,
        )
        refusal = decision.refusal
        return _Answer(
            "allow" if refusal is None else "deny",
            refusal or "",
            scopes=decision.scopes,
            rules=decision.rules,
        )
    if question.service is not None:
        return _service_answer(authz, question, recorded)
    reading = ReadContext(question.context)
    chain = decide_chain(
        authz,
        question.principals,
        question.action,
        question.resource,
        reading,
        question.scopes,
        question.task,
    )
    _check_reads(reading, recorded)
    result, reason = policy_result(
        chain,
        question.action,
        question.resource,
        question.context,
        question.auth_time,
        lambda: question.at,
    )
    if result == "allow":
        result, reason = _held(chain, question.action, question.refuses_holds)
    return _Answer(result, reason, chain)


def _service_answer(authz: Authorizer, question: Question, recorded: dict[str, Any]) -> _Answer:
    """A decision service check decided by ``authz`` as its API decides it, by the API's own
    function: /v1's one actor, the policy's allow alone (over the budget: refused); a chain,
    the contract's answer; AuthZEN's, `authzen.decide` (its answer's ``decision``); Oso
    Cloud's, `oso_cloud.authorize`. Its chain decision comes with it, so that the rules of a
    changed one are named."""
    reading = ReadContext(question.context)
    asked = (question.action, question.resource)
    service, actor = question.service, question.principals[0]
    if service == "v1_chain":
        chain = decide_chain(authz, question.principals, *asked, reading, question.service_scopes)
        allowed = chain.allowed
        reason = "insufficient_scope" if chain.missing_scopes else chain.reason or ""
    elif service == _AUTHZEN:
        evaluation = authzen.Evaluation(actor, *asked, reading, question.scopes)
        reply, chain = authzen.decide(authz, evaluation)
        allowed, reason = reply["decision"], _authzen_reason(reply)
    else:
        if service == _OSO_CLOUD:
            allowed, refused = oso_cloud.authorize(authz, actor, *asked, reading)
            reason = refused or ""
        else:
            try:
                allowed, reason = authz.authorize(actor, *asked, reading), ""
            except EvaluationLimit as over:
                allowed, reason = False, over.reason
        chain = ChainDecision(allowed, (actor,), refused_by=None if allowed else actor)
    # Its context is kept whole, but for what an API worked out beside it (`worked_out`).
    _check_reads(reading, recorded, arguments_kept=True, worked_out=question.worked_out)
    return _Answer("allow" if allowed else "deny", reason, chain)


def _authzen_reason(reply: dict[str, Any]) -> str:
    """Why AuthZEN's answer ``reply`` refused, as it says it: its ``context.reason``, or the
    first obligation it was refused for (``requires_approval``, ``requires_scope``)."""
    context = reply.get("context", {})
    if "reason" in context:
        return context["reason"]
    if reply["decision"]:
        return ""
    names = [o["properties"]["name"] for o in context.get("obligations", ())]
    return names[0] if names else ""


def _check_reads(
    reading: ReadContext,
    recorded: dict[str, Any],
    arguments_kept: bool = False,
    worked_out: bool = True,
) -> None:
    """`NotReplayable` if the policy read what the record cannot tell: the arguments (kept
    as a digest by the gateway), or, where fields were ``worked_out`` beside the context, one
    of them (`_WORKED_OUT`) not worked out then."""
    paths = reading.paths.union((name,) for name in reading.fields)
    if not arguments_kept and any(path[0] == "arguments" for path in paths):
        raise NotReplayable("arguments_not_recorded")
    if not worked_out:
        return
    for path in paths:
        if path[0] in _WORKED_OUT and _at(recorded, path) is _ABSENT:
            raise NotReplayable("context_not_recorded")


def _at(value: Any, path: tuple) -> Any:
    for name in path:
        if not isinstance(value, dict) or name not in value:
            return _ABSENT
        value = value[name]
    return value


def _held(chain: ChainDecision, action: str, refused: bool = False) -> tuple[str, str]:
    """An allowed answer that a person must approve, or whose result a person must review, is
    held (as the gateway holds it): a record allowed without either was not. ``refused``: of a
    message the gateway holds nothing of (`Question.refuses_holds`), refused instead, with the
    obligation as its reason, as the gateway refuses it. A review of a ``connect`` holds
    nothing (it has no result): allowed, as the gateway lets it through (refusing it only where
    nobody may review, which is the approvers' to say, not replayed)."""
    obligations = chain.obligations
    if obligations.requires_approval and not obligations.approval_granted:
        return ("deny", "requires_approval") if refused else ("held", "approval_required")
    if obligations.requires_review and action != "connect":
        return ("deny", "requires_review") if refused else ("held", "review_required")
    return "allow", ""


def _rules(
    authz: Authorizer, question: Question, chain: ChainDecision, result: str, reason: str
) -> tuple[str, ...]:
    """The rules that decided the candidate's different answer: of the principal it turned on
    (the one refused, else the last), as the gateway's records name them; those that require
    the hold, for a held one. None over budget, or where explaining spends its own budget."""
    if reason == EvaluationLimit.reason:
        return ()
    asked = (question.action, question.resource)
    try:
        with authz.session(question.context) as s:
            if result != "held" and reason not in _HOLD_REFUSALS:
                return tuple(s.explain(explained_principal(chain), *asked).rules())
            approval = reason in ("approval_required", "requires_approval")
            held = "requires_approval" if approval else "requires_review"
            rules: list[str] = []
            for principal in question.principals:
                rules += (r for r in s.prove(held, principal, *asked).rules() if r not in rules)
            return tuple(rules)
    except EvaluationLimit:
        return ()
