"""OpenID AuthZEN Authorization API 1.0: its requests as bastion decisions, and its answers, with
obligations in the shape of the AuthZEN Obligations Profile (draft 1).

A subject or resource ``{type, id}`` is the entity ``type{"id"}``; an action ``{name}`` is the
action string. Their ``properties`` reach the policy as ``context.subject``,
``context.resource`` and ``context.action``, beside the fields of the request's own ``context``
(which may not use those three names). The token scopes the caller holds, for
``requires_scope``, are ``context.scopes``. Every evaluation is decided by the decision contract
(`bastion.decide.contract`), so a denial, a refusal and the obligations are the gateway's.
Nothing here knows HTTP: `bastion.server.api.authzen` serves it (docs/authzen.md).
"""

from __future__ import annotations

import base64
import binascii
import bisect
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bastion import untrusted_json
from bastion.decide import Authorizer
from bastion.decide.contract import ChainDecision, decide_chain, decide_chain_in, refusing_writes
from bastion.facts.model import Entity, FactError
from bastion.facts.store import check_entity_size, check_string_size

SEMANTICS = ("execute_all", "deny_on_first_deny", "permit_on_first_permit")
# The names under which the subject's, resource's and action's properties reach the policy.
RESERVED_CONTEXT = ("subject", "resource", "action")
SEARCHES = ("subject", "resource", "action")
# Obligations are of the profile's type "custom", each named by "name" (docs/authzen.md).
VENDOR = "bastion"


class AuthzenError(ValueError):
    """A request AuthZEN calls malformed (HTTP 400); the message names the field and the fix."""

    status = 400


class StaleToken(AuthzenError):
    """A well-formed page token this search cannot continue from: issued for another request,
    or not by bastion (HTTP 422, as `/v1` answers what is well formed but refused)."""

    status = 422


@dataclass(frozen=True, slots=True)
class Party:
    """A subject or a resource as sent: ``id`` is None where a search leaves it out."""

    type: str
    id: str | None
    properties: dict


@dataclass(frozen=True, slots=True)
class Action:
    name: str
    properties: dict


@dataclass(frozen=True, slots=True)
class Evaluation:
    """One access question, ready to decide."""

    subject: Entity
    action: str
    resource: Entity
    # The policy's context: the request's, with the properties under RESERVED_CONTEXT.
    context: dict
    # The token scopes the caller says the subject holds (context.scopes).
    scopes: frozenset[str]

    def request_json(self) -> dict:
        """The question as the decision log keeps it (and `/v1/decisions/{id}` shows it)."""
        return {
            "actor": {"type": self.subject.type, "id": self.subject.id},
            "action": self.action,
            "resource": {"type": self.resource.type, "id": self.resource.id},
        }

    @classmethod
    def recorded(cls, request: dict, context: dict) -> Evaluation:
        """The evaluation a decision record keeps (`request_json`, and ``context``: the
        policy's context it kept beside it), read back to be decided again (``bastion audit
        replay``); `AuthzenError` where the record does not hold one."""
        try:
            subject, resource = request["actor"], request["resource"]
            parties = (subject["type"], subject["id"], resource["type"], resource["id"])
            action = request["action"]
        except (KeyError, TypeError):
            raise AuthzenError("not the record of an evaluation") from None
        if not all(part.__class__ is str for part in (*parties, action)):
            raise AuthzenError("not the record of an evaluation")
        return cls(
            Entity(parties[0], parties[1]),
            action,
            Entity(parties[2], parties[3]),
            context,
            _scopes(context),
        )


@dataclass(frozen=True, slots=True)
class Batch:
    """An Access Evaluations request: each item an `Evaluation`, or the error that makes it
    one that cannot be decided (answered ``false`` with the error, the batch goes on)."""

    items: tuple[Evaluation | AuthzenError, ...]
    semantic: str


@dataclass(frozen=True, slots=True)
class Search:
    """A Subject, Resource or Action Search request."""

    kind: str  # one of SEARCHES: what is searched for
    subject: Party
    action: Action | None  # None for an action search
    resource: Party
    context: dict
    limit: int
    # Where the previous page ended (from its token); None from the start.
    after: str | None
    # Binds a page token to its request: the spec asks for the same request on every page.
    digest: str


# -- reading requests --------------------------------------------------------------------------


def _object(value: Any, where: str) -> dict:
    if value.__class__ is not dict:
        raise AuthzenError(f"{where} must be an object, got {_shown(value)}")
    return value


def _text(body: dict, name: str, where: str) -> str:
    value = body.get(name)
    if value is None:
        raise AuthzenError(f"{where}.{name} is required")
    if value.__class__ is not str:
        raise AuthzenError(f"{where}.{name} must be a string, got {_shown(value)}")
    return value


def _properties(body: dict, where: str) -> dict:
    value = body.get("properties")
    if value is None:  # absent, or null (which the spec asks senders to leave out)
        return {}
    return _object(value, f"{where}.properties")


def read_party(value: Any, where: str, *, id_required: bool = True) -> Party:
    """A subject or resource: ``type`` (not empty) and ``id`` strings, optional ``properties``;
    refused if no fact can hold the entity (`check_entity_size`). With ``id_required`` false (the
    searched-for entity) an ``id`` is ignored, as the spec says."""
    if value is None:
        raise AuthzenError(f"{where} is required")
    body = _object(value, where)
    type_ = _text(body, "type", where)
    if not type_:
        raise AuthzenError(f"{where}.type must not be empty")
    id_ = _text(body, "id", where) if id_required else None
    try:
        check_entity_size(type_, id_ or "")
    except FactError as e:
        raise AuthzenError(f"{where}: {e}") from None
    return Party(type_, id_, _properties(body, where))


def read_action(value: Any, where: str = "action") -> Action:
    if value is None:
        raise AuthzenError(f"{where} is required")
    body = _object(value, where)
    name = _text(body, "name", where)
    try:
        check_string_size(name)
    except FactError as e:
        raise AuthzenError(f"{where}.name: {e}") from None
    return Action(name, _properties(body, where))


def read_context(value: Any, where: str = "context") -> dict | None:
    if value is None:
        return None
    context = _object(value, where)
    for name in RESERVED_CONTEXT:
        if name in context:
            raise AuthzenError(
                f"{where}.{name}: bastion gives the policy the {name}'s properties under this"
                f" name; send them as {name}.properties, or use another name in {where}"
            )
    return context


def _scopes(context: dict | None) -> frozenset[str]:
    """The scopes the caller says the subject's token holds: ``context.scopes``, a list of
    strings or one space-separated string (OAuth's form). None given: none held."""
    value = (context or {}).get("scopes")
    if value is None:
        return frozenset()
    if value.__class__ is str:
        return frozenset(value.split())
    if value.__class__ is list and all(s.__class__ is str for s in value):
        return frozenset(value)
    raise AuthzenError(
        f"context.scopes must be a list of strings or a space-separated string, got {_shown(value)}"
    )


def policy_context(
    context: dict | None, subject: Party, action: Action | None, resource: Party
) -> dict:
    """The context the policy reads: the request's, and each entity's properties."""
    merged = dict(context or {})
    merged["subject"] = subject.properties
    merged["resource"] = resource.properties
    merged["action"] = action.properties if action is not None else {}
    return merged


def evaluation(subject: Party, action: Action, resource: Party, context: dict | None) -> Evaluation:
    assert subject.id is not None and resource.id is not None
    return Evaluation(
        Entity(subject.type, subject.id),
        action.name,
        Entity(resource.type, resource.id),
        policy_context(context, subject, action, resource),
        _scopes(context),
    )


def read_evaluation(body: dict) -> Evaluation:
    """An Access Evaluation request (subject, action and resource required; context optional;
    other fields ignored)."""
    return evaluation(
        read_party(body.get("subject"), "subject"),
        read_action(body.get("action")),
        read_party(body.get("resource"), "resource"),
        read_context(body.get("context")),
    )


def read_batch(body: dict, max_evaluations: int) -> Batch | None:
    """An Access Evaluations request, or None when it has no ``evaluations`` (or an empty
    array): then it is an Access Evaluation request, as the spec says.

    The top-level subject, action, resource and context are defaults: an evaluation that gives
    one replaces it whole. An error at the top level (a malformed default, an unknown
    semantic) is the whole request's; an evaluation that cannot be read is that item's.
    """
    items = body.get("evaluations")
    if items is None or items == []:
        return None
    if items.__class__ is not list:
        raise AuthzenError(f"evaluations must be an array, got {_shown(items)}")
    if len(items) > max_evaluations:
        raise AuthzenError(
            f"evaluations holds at most {max_evaluations} items (authzen_max_evaluations),"
            f" got {len(items)}; split the request"
        )
    options = body.get("options")
    semantic = "execute_all"
    if options is not None:
        semantic = _object(options, "options").get("evaluations_semantic")
        if semantic is None:  # absent, or null (which the spec asks senders to leave out)
            semantic = "execute_all"
        elif semantic not in SEMANTICS:
            raise AuthzenError(
                f"options.evaluations_semantic must be one of {', '.join(SEMANTICS)}, got"
                f" {_shown(semantic)}"
            )
    defaults = {
        "subject": _default(body, "subject", read_party),
        "action": _default(body, "action", read_action),
        "resource": _default(body, "resource", read_party),
        "context": read_context(body.get("context")),
    }
    _scopes(defaults["context"])  # a malformed default is the whole request's error
    out: list[Evaluation | AuthzenError] = []
    for i, item in enumerate(items):
        try:
            out.append(_batch_item(item, f"evaluations[{i}]", defaults))
        except AuthzenError as e:
            out.append(e)
    return Batch(tuple(out), semantic)


def _default(body: dict, name: str, read: Any) -> Any:
    return None if body.get(name) is None else read(body[name], name)


def _batch_item(item: Any, where: str, defaults: dict) -> Evaluation:
    item = _object(item, where)

    def pick(name: str, read: Any) -> Any:
        if item.get(name) is not None:
            return read(item[name], f"{where}.{name}")
        if defaults[name] is None:
            raise AuthzenError(f"{where}.{name} is required (and no top-level {name} is given)")
        return defaults[name]

    context = (
        read_context(item["context"], f"{where}.context")
        if item.get("context") is not None
        else defaults["context"]
    )
    return evaluation(
        pick("subject", read_party),
        pick("action", read_action),
        pick("resource", read_party),
        context,
    )


def read_search(body: dict, kind: str, max_page: int) -> Search:
    """A search request for ``kind`` (subject, resource or action): the searched-for entity
    needs only a type (its id, if sent, is ignored), every other entity is complete; an
    action search has no action."""
    subject = read_party(body.get("subject"), "subject", id_required=kind != "subject")
    resource = read_party(body.get("resource"), "resource", id_required=kind != "resource")
    action = read_action(body.get("action")) if kind != "action" else None
    context = read_context(body.get("context"))
    _scopes(context)  # malformed scopes are refused here as in a decision
    page = body.get("page")
    limit, token, page_properties = None, None, None
    if page is not None:
        page = _object(page, "page")
        # Implementation-specific attributes (spec §8.2.1); bastion declares none, so they
        # change nothing, but like every other value they must stay the same on every page.
        if page.get("properties") is not None:
            page_properties = _object(page["properties"], "page.properties")
        if page.get("limit") is not None:
            limit = _limit(page["limit"], max_page)
        if page.get("token") is not None:
            token = page["token"]
            if token.__class__ is not str:
                raise AuthzenError(f"page.token must be a string, got {_shown(token)}")
            token = token or None  # "" is the end of a previous search, not a position
    digest = _digest(kind, subject, action, resource, context, page_properties)
    after = None
    if token is not None:
        after, limit = _position(token, digest, limit, max_page)
    full = policy_context(context, subject, action, resource)
    limit = max_page if limit is None else limit
    return Search(kind, subject, action, resource, full, limit, after, digest)


def _limit(value: Any, max_page: int) -> int:
    """A page size as sent: a whole number, 0 or more; more than ``max_page`` is served as it."""
    if value.__class__ is float and value.is_integer():
        value = int(value)
    if value.__class__ is not int or value < 0:
        raise AuthzenError(f"page.limit must be a whole number, 0 or more, got {value!r}")
    return min(value, max_page)


# -- deciding ----------------------------------------------------------------------------------


def _nobody(_subject: Entity) -> bool:
    return False


def _held(subject: Entity) -> ChainDecision:
    """The refusal of a subject the deployment holds (bastion's kill switch), before the policy
    is asked: ``decision`` false, ``context.reason`` "suspended"."""
    return ChainDecision(False, (subject,), refused_by=subject, reason="suspended")


def decide(
    authz: Authorizer, question: Evaluation, held: Callable[[Entity], bool] = _nobody
) -> tuple[dict, ChainDecision]:
    """The Access Evaluation answer to ``question``, and the contract's decision behind it;
    refused whatever the policy says when ``held(subject)``."""
    if held(question.subject):
        decision = _held(question.subject)
    else:
        decision = _decided(
            question,
            decide_chain(
                authz,
                (question.subject,),
                question.action,
                question.resource,
                question.context,
                question.scopes,
            ),
        )
    return answer(decision), decision


def decide_batch(
    authz: Authorizer, batch: Batch, held: Callable[[Entity], bool] = _nobody
) -> list[tuple[dict, ChainDecision | None]]:
    """The answers of a batch in order, stopped early as its semantic says; each with the
    decision behind it (None for an item that could not be read). One session: one view of
    the facts and one evaluation budget for the whole batch, as for one decision. A subject
    ``held`` is refused as in `decide`."""
    out: list[tuple[dict, ChainDecision | None]] = []
    with authz.session() as s:
        for item in batch.items:
            decision = None
            if isinstance(item, AuthzenError):
                reply = {
                    "decision": False,
                    "context": {"error": {"status": 400, "message": str(item)}},
                }
            else:
                if held(item.subject):
                    decision = _held(item.subject)
                else:
                    decision = _decided(
                        item,
                        decide_chain_in(
                            s,
                            (item.subject,),
                            item.action,
                            item.resource,
                            item.context,
                            item.scopes,
                        ),
                    )
                reply = answer(decision)
            out.append((reply, decision))
            if batch.semantic == "deny_on_first_deny" and not reply["decision"]:
                break
            if batch.semantic == "permit_on_first_permit" and reply["decision"]:
                break
    return out


def _decided(question: Evaluation, decision: ChainDecision) -> ChainDecision:
    """The contract's ``decision`` as AuthZEN answers it: a write the read-only downgrade
    refuses is a denial (`refusing_writes`), as at the gateway, never a permit a PEP could
    take for a plain one."""
    return refusing_writes(decision, question.action, question.resource, question.context)


def answer(decision: ChainDecision) -> dict:
    """A Decision object: ``decision``, and a ``context`` only when there is something to say
    (obligations, or why bastion refused), so that a PEP that rejects what it does not
    understand is not given anything to reject on a plain answer."""
    obligations: list[dict] = []
    context: dict[str, Any] = {}
    allowed = decision.allowed
    found = decision.obligations
    if allowed and found.requires_approval and not found.approval_granted:
        # bastion cannot hold an AuthZEN call for a person: denied until one approves.
        allowed = False
        obligations.append(_obligation("requires_approval"))
    elif allowed:
        if found.masks:
            obligations.append(_obligation("mask", paths=list(found.masks)))
        for limit in found.rate_limits:
            obligations.append(_obligation("rate_limit", max=limit.max, seconds=limit.seconds))
        if found.requires_review:
            obligations.append(_obligation("requires_review"))
        if found.max_auth_age is not None:
            obligations.append(_obligation("requires_recent_auth", max_age=found.max_auth_age))
        if found.read_only:
            # Downgraded on the target's server: only tools annotated read-only may be called.
            obligations.append(_obligation("read_only"))
    elif decision.missing_scopes:
        obligations.append(
            _obligation(
                "requires_scope",
                scopes=list(found.required_scopes),
                missing=list(decision.missing_scopes),
            )
        )
    elif decision.reason is not None:
        context["reason"] = decision.reason
        if decision.limit is not None:
            context["limit"] = decision.limit
        if decision.undecided is not None:
            context["undecided"] = decision.undecided
        if decision.stale_signals:
            context["stale_signals"] = list(decision.stale_signals)
    if obligations:
        for n, obligation in enumerate(obligations, 1):
            obligation["id"] = f"obl-{n}"
        context["obligations"] = obligations
    out: dict[str, Any] = {"decision": allowed}
    if context:
        out["context"] = context
    return out


def _obligation(name: str, **properties: Any) -> dict:
    """An obligation of the profile's ``custom`` type: bastion's contract names no ACR (the
    profile's ``step-up`` needs one), and the profile has no type for the others."""
    return {
        "id": "",
        "type": "custom",
        "properties": {"vendor": VENDOR, "name": name, **properties},
    }


# -- searching ---------------------------------------------------------------------------------


def search(authz: Authorizer, question: Search, held: Callable[[Entity], bool] = _nobody) -> dict:
    """The Search API answer: every permitted subject, resource or action (``allow`` and no
    ``deny``), sorted, one page of them, and ``page.next_token`` ("" on the last page). A
    subject ``held`` is permitted nothing (its search answers no results, with
    ``context.reason`` "suspended"), and is left out of a subject search."""
    after = question.after
    if question.kind != "subject":
        subject = Entity(question.subject.type, question.subject.id or "")
        if held(subject):
            page = {"next_token": "", "count": 0, "total": 0}
            return {"page": page, "context": {"reason": "suspended"}, "results": []}
    if question.kind == "resource":
        subject = Entity(question.subject.type, question.subject.id or "")
        ids = authz.list(subject, question.action.name, question.resource.type, question.context)
    elif question.kind == "subject":
        subject_type = question.subject.type
        ids = [i for i in _subjects(authz, question) if not held(Entity(subject_type, i))]
    else:
        subject = Entity(question.subject.type, question.subject.id or "")
        resource = Entity(question.resource.type, question.resource.id or "")
        ids = sorted(authz.actions(subject, resource, question.context))
    start = _after(ids, after)
    chosen = ids[start : start + question.limit]
    # A page of 0 asks for the count: it ends there, since its token could only ask for
    # another page of 0 from the same place (docs/authzen.md, "Pagination").
    more = question.limit > 0 and start + len(chosen) < len(ids)
    next_token = (
        _token(chosen[-1] if chosen else after, question.digest, question.limit) if more else ""
    )
    if question.kind == "action":
        results = [{"name": name} for name in chosen]
    else:
        kind = question.subject.type if question.kind == "subject" else question.resource.type
        results = [{"type": kind, "id": id_} for id_ in chosen]
    page = {"next_token": next_token, "count": len(results), "total": len(ids)}
    return {"page": page, "results": results}


def _subjects(authz: Authorizer, question: Search) -> list[str]:
    """Ids of the subjects of the type asked that may do the action on the resource: those the
    ``allow`` rules find (entities some fact mentions, as `Authorizer.list`), less ``deny``
    (`Session.rows` leaves out what a ``deny`` rule refuses)."""
    assert question.action is not None and question.resource.id is not None
    action, resource = question.action.name, Entity(question.resource.type, question.resource.id)
    with authz.session(question.context) as s:
        found = {
            e
            for e in s.rows("allow", "fbb", action, resource)
            if e.__class__ is Entity and e.type == question.subject.type
        }
        return sorted(e.id for e in found)


def _after(ids: Sequence[str], after: str | None) -> int:
    if after is None:
        return 0
    return bisect.bisect_right(ids, after)


def _digest(
    kind: str,
    subject: Party,
    action: Action | None,
    resource: Party,
    context: dict | None,
    page_properties: dict | None,
) -> str:
    request = [
        kind,
        [subject.type, subject.id, subject.properties],
        None if action is None else [action.name, action.properties],
        [resource.type, resource.id, resource.properties],
        context,
    ]
    if page_properties is not None:
        # Appended only when sent, so that a token issued before page.properties was bound
        # still continues the search it was issued for.
        request.append(page_properties)
    text = json.dumps(request, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _token(after: str | None, digest: str, limit: int) -> str:
    """A page token: where this page ended, the request it belongs to, and its page size (which
    a follow-up that sends the token alone keeps, as the spec's example does)."""
    data = json.dumps({"a": after, "q": digest, "n": limit}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _position(token: str, digest: str, limit: int | None, max_page: int) -> tuple[str | None, int]:
    """Where ``token`` says the previous page ended, and the search's page size: the token's, or
    ``limit`` if the follow-up sends one, which must be the same. A token of another request,
    or one not issued here, is refused (the spec asks for the same request on every page). The
    token is the client's: what it decodes to is anyone's JSON, read as a body is (nesting
    bounded, each name once), never a RecursionError."""
    try:
        padded = token + "=" * (-len(token) % 4)
        # JsonRefused is a ValueError.
        data = untrusted_json.loads(base64.urlsafe_b64decode(padded.encode()), max_depth=1)
        after, issued_for, size = data["a"], data["q"], data["n"]
    except (ValueError, binascii.Error, KeyError, TypeError):
        raise StaleToken(
            "page.token is not a token this server issued: send the next_token of the previous"
            " page, or no token to start again"
        ) from None
    if (
        issued_for != digest
        or (after is not None and after.__class__ is not str)
        or size.__class__ is not int
        or size < 0
        or (limit is not None and limit != min(size, max_page))
    ):
        raise StaleToken(
            "page.token belongs to another search: send the same subject, action, resource,"
            " context, page.properties and page.limit (or none) as the request that returned"
            " it, or no token to start again"
        )
    return after, min(size, max_page)


# -- metadata ----------------------------------------------------------------------------------

ENDPOINTS = {
    "access_evaluation_endpoint": "/access/v1/evaluation",
    "access_evaluations_endpoint": "/access/v1/evaluations",
    "search_subject_endpoint": "/access/v1/search/subject",
    "search_resource_endpoint": "/access/v1/search/resource",
    "search_action_endpoint": "/access/v1/search/action",
}


def metadata(base_url: str) -> dict:
    """The PDP metadata document for a PDP at ``base_url`` (its identifier)."""
    base = base_url.rstrip("/")
    document: dict[str, Any] = {"policy_decision_point": base}
    document.update({name: base + path for name, path in ENDPOINTS.items()})
    document["supported_obligations"] = ["custom"]
    return document


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
