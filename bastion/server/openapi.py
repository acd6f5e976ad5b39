"""The OpenAPI 3.1 document of the `/v1` API, served at ``/v1/openapi.json``.

It describes exactly what the handlers accept and answer: a request the document allows is not
refused as malformed (a 400); a request it forbids is refused. What is well formed but does not
fit the policy in force (an undeclared entity type, an undefined predicate, a fact the policy
cannot use, a policy that does not load) is a 422. ``tests/server/test_openapi.py`` holds the
server to it with schemathesis.

No string and no key of a request may hold U+0000 (NUL): the server refuses it on every route
(`bastion.server.request_limits`, `bastion.untrusted_json`). The document says so once, as it is
served: every string schema without a pattern of its own gets `NO_NUL`, every object's keys too
(`_text_only`); the patterns written here exclude NUL themselves.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from bastion.agents.registry import MAX_PURPOSE_CHARS
from bastion.agents.registry import STATUSES as AGENT_STATUSES
from bastion.approvals import service as approvals_service
from bastion.approvals.store import KINDS, STATUSES
from bastion.delegation.tasks import STATUSES as TASK_STATUSES
from bastion.facts.store import MAX_ENTITY_ID, MAX_ENTITY_TYPE, MAX_STRING
from bastion.names import MAX_NAME_LENGTH
from bastion.server.api import agents as agents_api
from bastion.server.api import alerts as alerts_api
from bastion.server.api import approvals as approvals_api
from bastion.server.api import connections as connections_api
from bastion.server.api import labels as labels_api
from bastion.server.api import signals as signals_api
from bastion.server.api import suspensions as suspensions_api
from bastion.server.api import tasks as tasks_api
from bastion.server.api import tools as tools_api
from bastion.server.api.decisions import MAX_BATCH, MAX_CHAIN
from bastion.server.api.decisions import MAX_PAGE as MAX_LIST_PAGE
from bastion.server.api.facts import MAX_PAGE as MAX_FACTS_PAGE
from bastion.server.keys import MAX_KEY_SECONDS, SCOPES
from bastion.server.problems import DEFAULT_LIMIT
from bastion.signals import store as signals
from bastion.signals.suspensions import KINDS as SUSPENSION_KINDS
from bastion.untrusted_json import MAX_INTEGER, MIN_INTEGER


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict) -> dict:
    """An optional field: the handlers take ``null`` as leaving it out."""
    return {"anyOf": [schema, {"type": "null"}]}


def _request(required: list[str], **props: Any) -> dict:
    """A request object; fields the handler does not read are ignored (but still checked as
    JSON: bounded numbers, bounded nesting)."""
    return {
        "type": "object",
        "required": required,
        "properties": props,
        "additionalProperties": _ref("JsonValue"),
    }


def _response(required: list[str], **props: Any) -> dict:
    return {"type": "object", "required": required, "properties": props}


_STR = {"type": "string"}
# An entity's type and id in a question: at most what a fact can hold (`check_entity_size`).
_ENTITY_TYPE = {**_STR, "minLength": 1, "maxLength": MAX_ENTITY_TYPE}
_ENTITY_ID = {**_STR, "maxLength": MAX_ENTITY_ID}
_ACTION = {**_STR, "maxLength": MAX_STRING}
_LABEL_ID = {**_STR, "minLength": 1, "maxLength": labels_api.MAX_ID_LENGTH}
_BOOL = {"type": "boolean"}
# A policy's warnings refused as errors (always so with the setting policy_strict).
_STRICT = {
    **_nullable(_BOOL),
    "description": "refuse the policy if it has a warning (always so with policy_strict)",
}
# Every number the API reads is finite and within 64 bits (bastion.untrusted_json).
_INT = {"type": "integer", "minimum": MIN_INTEGER, "maximum": MAX_INTEGER}
_NUM = {"type": "number", "minimum": MIN_INTEGER, "maximum": MAX_INTEGER}
_SEQUENCE = {**_INT, "minimum": 0}
_CTX = _nullable(
    {
        "type": "object",
        "additionalProperties": _ref("JsonValue"),
        "description": "live attributes of the request, read by the policy",
    }
)
_AT_LEAST = _nullable(
    {
        **_SEQUENCE,
        "description": "a sequence returned by a write: wait (bounded) until it is applied",
    }
)
_EXPIRES_AT = _nullable({**_NUM, "description": "epoch seconds; the fact stops counting then"})

_SUSPENSION_KIND = {"enum": list(SUSPENSION_KINDS)}
_SUSPENSION_ID = {
    **_STR,
    "minLength": 1,
    "maxLength": suspensions_api.MAX_ID_LENGTH,
    "pattern": suspensions_api.ID_PATTERN,
}

SCHEMAS: dict[str, Any] = {
    "JsonValue": {
        "description": "any JSON value: numbers finite and within 64 bits, nesting bounded",
        "anyOf": [
            {"type": "null"},
            _BOOL,
            _STR,
            _NUM,
            {"type": "array", "items": _ref("JsonValue")},
            {"type": "object", "additionalProperties": _ref("JsonValue")},
        ],
    },
    "EntityObject": {
        "type": "object",
        "required": ["type", "id"],
        "properties": {"type": {"type": "string", "minLength": 1}, "id": _STR},
        "additionalProperties": False,
    },
    # An entity a decision is asked about: none that no fact could hold (`check_entity_size`).
    "AskedEntityObject": {
        "type": "object",
        "required": ["type", "id"],
        "properties": {"type": _ENTITY_TYPE, "id": _ENTITY_ID},
        "additionalProperties": False,
    },
    "Entity": {
        "anyOf": [
            _ref("AskedEntityObject"),
            {
                "type": "string",
                # ENTITY_SHORT_FORM, without the NUL no request may hold, its parts bounded.
                "pattern": f"^[^:\\u0000]{{1,{MAX_ENTITY_TYPE}}}:[^\\u0000]{{1,{MAX_ENTITY_ID}}}$",
                "description": 'short form "Type:id"',
            },
        ]
    },
    "FactArg": {"anyOf": [_ref("EntityObject"), _STR, _BOOL, _INT]},
    "Fact": {
        "type": "object",
        "required": ["predicate"],
        "properties": {
            "predicate": _STR,
            "args": {"type": "array", "items": _ref("FactArg")},
            "expires_at": _EXPIRES_AT,
        },
        "additionalProperties": _ref("JsonValue"),
    },
    "Pattern": {
        "type": "object",
        "description": "a fact where null matches any value",
        "required": ["predicate"],
        "properties": {
            "predicate": _STR,
            "args": {"type": "array", "items": _nullable(_ref("FactArg"))},
        },
        "additionalProperties": _ref("JsonValue"),
    },
    "Check": {
        **_request(
            ["actor", "action", "resource"],
            actor=_ref("Entity"),
            action=_ACTION,
            resource=_ref("Entity"),
            context=_CTX,
        ),
        "not": {"required": ["principals"]},
    },
    "ChainCheck": {
        **_request(
            ["principals", "action", "resource"],
            principals={
                "type": "array",
                "items": _ref("Entity"),
                "minItems": 1,
                "maxItems": MAX_CHAIN,
                "description": "the user first, then each agent acting for them: allowed only"
                " if every one is",
            },
            action=_ACTION,
            resource=_ref("Entity"),
            context=_CTX,
            scopes=_nullable(
                {
                    "type": "array",
                    "items": _STR,
                    "description": "the caller's OAuth scopes, checked against requires_scope",
                }
            ),
        ),
        "not": {"required": ["actor"]},
    },
    "ChainAnswer": {
        "type": "object",
        "description": "with principals: who refused, and the obligations of an allowed chain",
        "properties": {
            "refused_by": _nullable(_ref("EntityObject")),
            "missing_scopes": {"type": "array", "items": _STR},
            "stale_signals": {"type": "array", "items": _STR},
            "obligations": {
                "type": "object",
                "properties": {
                    "masks": {"type": "array", "items": _STR},
                    "rate_limits": {"type": "array", "items": {"type": "object"}},
                    "required_scopes": {"type": "array", "items": _STR},
                    "requires_approval": _BOOL,
                    "requires_review": _BOOL,
                    "read_only": _BOOL,
                    "max_auth_age": _nullable(_INT),
                    "alerts": {"type": "array", "items": {"type": "object"}},
                },
            },
        },
    },
    "Agent": _response(
        ["client_id", "name", "purpose", "owner", "parent", "status"],
        client_id=_STR,
        name=_STR,
        purpose=_STR,
        owner=_nullable(_STR),
        parent=_nullable(_STR),
        status={"enum": list(AGENT_STATUSES)},
        source=_STR,
        token_endpoint_auth_method=_STR,
        created_at=_NUM,
        suspended_until=_nullable(_NUM),
        stopped=_nullable(_STR),
    ),
    "Write": _response(
        ["sequence", "inserted", "deleted"], sequence=_INT, inserted=_INT, deleted=_INT
    ),
    "StoredFact": _response(
        ["predicate", "args"],
        predicate=_STR,
        args={"type": "array", "items": _ref("FactArg")},
        expires_at=_NUM,
    ),
    "PolicyVersion": _response(
        ["version", "created_at", "created_by", "source", "note"],
        version=_INT,
        created_at=_NUM,
        created_by=_STR,
        source=_STR,
        note=_STR,
    ),
    "ApiKey": _response(
        ["id", "name", "scopes", "created_at", "created_by", "expires_at", "revoked_at"],
        id=_STR,
        name=_STR,
        scopes={"type": "array", "items": {"enum": list(SCOPES)}},
        created_at=_NUM,
        created_by=_STR,
        expires_at=_nullable(_NUM),
        revoked_at=_nullable(_NUM),
    ),
    "Explanation": _response(
        ["allowed", "text"],
        allowed=_BOOL,
        text=_STR,
        detail=_nullable({"type": "object"}),
    ),
    "Decision": _response(
        [
            "decision_id",
            "kind",
            "request",
            "result",
            "sequence",
            "policy_version",
            "at",
            "asked_by",
            "api",
        ],
        decision_id=_STR,
        kind={"enum": ["authorize", "list", "actions", "query"]},
        request={"type": "object"},
        result={},
        sequence=_INT,
        policy_version=_nullable(_INT),
        at=_NUM,
        asked_by=_nullable(_STR),
        # The API it was asked through; null in a record stored before records named it.
        api=_nullable({"enum": ["v1", "authzen", "oso_cloud"]}),
    ),
    "ApprovalAnswer": _response(
        ["approver", "answer", "minutes", "channel", "reason", "at", "withheld_fields"],
        approver=_STR,
        answer={"enum": ["approve", "deny"]},
        minutes=_INT,
        channel=_STR,
        reason=_STR,
        at=_NUM,
        withheld_fields={"type": "array", "items": _STR},
    ),
    "Alert": _response(
        [
            "id",
            "name",
            "principal",
            "severity",
            "state",
            "count",
            "decision_ids",
            "detail",
            "first_at",
            "last_at",
            "owner",
            "recipients",
            "escalate_at",
            "escalated_to",
            "escalated_at",
            "acknowledged_by",
            "acknowledged_at",
            "acknowledged_channel",
        ],
        id=_STR,
        name={**_STR, "description": "the alert's name, as the policy rule or bastion gave it"},
        principal={**_STR, "description": 'the principal it is about: Agent{"client"}'},
        severity={"enum": ["low", "medium", "high", "critical"]},
        state={"enum": ["open", "acknowledged"]},
        count={**_INT, "description": "times raised within the cooldown"},
        decision_ids={
            "type": "array",
            "items": _STR,
            "description": "the decision records that raised it (bastion audit tail)",
        },
        detail={"type": "object"},
        first_at=_NUM,
        last_at=_NUM,
        owner=_nullable(_STR),
        recipients={"type": "array", "items": _STR},
        escalate_at=_nullable(_NUM),
        escalated_to={"type": "array", "items": _STR},
        escalated_at=_nullable(_NUM),
        acknowledged_by=_nullable(_STR),
        acknowledged_at=_nullable(_NUM),
        acknowledged_channel=_nullable({"enum": ["page", "api", "cli"]}),
    ),
    "ApprovalRequest": _response(
        [
            "id",
            "kind",
            "status",
            "user",
            "person",
            "confirmer",
            "agent",
            "agents",
            "task",
            "server",
            "method",
            "action",
            "target",
            "arguments",
            "arguments_digest",
            "policy_version",
            "decision_id",
            "rules",
            "approvers",
            "required",
            "self_approval_forbidden",
            "window_minutes",
            "created_at",
            "expires_at",
            "resolved_at",
            "used_at",
            "used_by",
            "withheld_fields",
            "answers",
        ],
        id=_STR,
        kind={"enum": list(KINDS), "description": "approval: a held call; review: a held result"},
        status={"enum": list(STATUSES)},
        user={
            **_STR,
            "description": "the user the agent acts for (for an agent acting as itself, by"
            " client credentials, its own client id)",
        },
        person={
            **_BOOL,
            "description": "whether a person stands behind the call (false: an agent acting"
            " as itself, and what it delegates)",
        },
        confirmer=_nullable(
            {
                **_STR,
                "description": "who confirms the call when no approver is named: the user, or"
                " the owner of an agent acting as itself (a bastion user); null: nobody",
            }
        ),
        agent={**_STR, "description": "the agent (OAuth client id)"},
        agents={
            "type": "array",
            "items": _STR,
            "description": "a delegated call's agents, first to calling (the last is agent);"
            " empty for an agent acting on the user's own grant",
        },
        task={
            **_STR,
            "description": "the task the call's token was for (docs/delegation.md); empty for"
            " none. An answer counts for calls under this task only",
        },
        server=_STR,
        method=_STR,
        action=_STR,
        target={**_STR, "description": 'the resource as the policy names it: Tool{"desk/x"}'},
        arguments={"description": "the call's arguments, in full (null when it had none)"},
        arguments_digest=_STR,
        policy_version=_INT,
        decision_id={**_STR, "description": "the decision that held the call"},
        rules={"type": "array", "items": _STR, "description": "why: the rules that held it"},
        approvers={
            "type": "array",
            "items": _STR,
            "description": "who may answer, as the policy said when it was held (empty: the"
            " confirmer confirms the call)",
        },
        self_approval_forbidden=_BOOL,
        window_minutes={
            **_INT,
            "description": "the longest an approval may last for this call (0: this call only)",
        },
        created_at=_NUM,
        expires_at=_NUM,
        resolved_at=_nullable(_NUM),
        used_at=_nullable(_NUM),
        used_by=_nullable({**_STR, "description": "the decision of the call it unlocked"}),
        withheld_fields={"type": "array", "items": _STR},
        answers={"type": "array", "items": _ref("ApprovalAnswer")},
    ),
    "Connection": _response(
        ["subject", "upstream", "scope", "access_token_expires_at", "created_at", "refreshed_at"],
        subject=_STR,
        upstream=_STR,
        scope=_STR,
        access_token_expires_at=_NUM,
        created_at=_NUM,
        refreshed_at=_NUM,
    ),
    "ToolPin": _response(
        ["server", "kind", "digest", "definition", "accepted_at", "accepted_by", "pending"],
        server=_STR,
        kind={"enum": ["tool", "prompt"]},
        tool={**_STR, "description": "the tool's name (kind tool)"},
        prompt={**_STR, "description": "the prompt's name (kind prompt)"},
        digest=_nullable(_STR),
        definition=_nullable({"type": "object"}),
        accepted_at=_nullable(_NUM),
        accepted_by=_nullable(_STR),
        pending=_nullable(
            _response(
                ["digest", "definition", "since", "changes"],
                digest=_STR,
                definition={"type": "object"},
                since=_NUM,
                changes={"type": "array", "items": _STR},
            )
        ),
    ),
    "Suspension": _response(
        ["kind", "id", "expires_at"],
        kind=_SUSPENSION_KIND,
        id=_SUSPENSION_ID,
        expires_at=_nullable(_NUM),
    ),
    "SignalSubject": {
        "type": "object",
        "required": ["type", "id"],
        "properties": {
            "type": {"enum": list(signals.SUBJECT_TYPES)},
            "id": {**_STR, "minLength": 1, "maxLength": signals.MAX_SUBJECT_ID},
        },
        "additionalProperties": False,
    },
    "SignalValue": {
        "anyOf": [_BOOL, _INT, {**_STR, "maxLength": signals.MAX_TEXT_VALUE}],
        "description": "a boolean, an integer or a string",
    },
    "Signal": _response(
        ["subject", "name", "value", "source", "set_at", "expires_at"],
        subject=_ref("SignalSubject"),
        name=_STR,
        value=_ref("SignalValue"),
        source=_STR,
        set_at={**_INT, "description": "epoch seconds: when it was set (its freshness)"},
        expires_at={**_NUM, "description": "epoch seconds: it stops counting then"},
    ),
    "Problem": _response(
        ["type", "title", "status", "detail"],
        type=_STR,
        title=_STR,
        status=_INT,
        detail={**_STR, "description": "what went wrong and what to fix"},
    ),
    "TaskFact": {
        "type": "object",
        "description": "a grant of the task: a fact naming the task's agent first, of a"
        " predicate [tasks].predicates allows (403 otherwise); it expires with the task",
        "required": ["predicate"],
        "properties": {
            "predicate": _STR,
            "args": {"type": "array", "items": _ref("FactArg")},
            "expires_at": {"type": "null", "description": "leave it out: the task's expiry"},
        },
        "additionalProperties": _ref("JsonValue"),
    },
    "Task": _response(
        [
            "id",
            "user",
            "agent",
            "purpose",
            "status",
            "facts",
            "created_by",
            "created_at",
            "expires_at",
            "ended_at",
            "ended_by",
            "end_reason",
            "grants",
        ],
        id=_STR,
        user=_STR,
        agent={**_STR, "description": "the OAuth client id of the agent the task lets act"},
        purpose=_STR,
        status={"enum": list(TASK_STATUSES)},
        facts={"type": "array", "items": _ref("Fact")},
        created_by=_STR,
        created_at=_NUM,
        expires_at=_NUM,
        ended_at=_nullable(_NUM),
        ended_by=_nullable(_STR),
        end_reason=_nullable(_STR),
        grants={**_INT, "description": "OAuth grants bound to the task (revoked when it ends)"},
    ),
}

# A property named "required" cannot be a keyword argument of _response.
SCHEMAS["ApprovalRequest"]["properties"]["required"] = {
    **_INT,
    "description": "distinct approvals needed",
}

_PROBLEM = {"application/problem+json": {"schema": _ref("Problem")}}
_WHY = {
    400: "malformed: the request does not match this document",
    401: "no API key, or an unknown, expired or revoked one",
    403: "the key lacks the scope this operation needs",
    404: "no such resource",
    408: "the request body did not arrive within body_timeout",
    409: "the decision cannot be explained",
    413: "the request body is larger than the limit (max_body_bytes, max_import_bytes)",
    422: "well formed, but refused by the policy in force or the state of the store",
    500: "an unexpected failure; the detail names nothing of the internals",
    503: "the database is unavailable, this replica's facts are stale, or it has not applied"
    " the write asked for with at_least; retry (Retry-After); for /v1/approvals and"
    " /v1/alerts also: this server has no approvals or alerts (no [gateway] configured)",
}


def _op(
    summary: str,
    scope: str | None,
    ok: dict | None = None,
    *,
    body: dict | None = None,
    body_type: str = "application/json",
    ok_type: str = "application/json",
    ok_status: int = 200,
    params: list | None = None,
    problems: tuple[int, ...] = (),
    links: dict | None = None,
    also: tuple[str, ...] = (),
) -> dict:
    """One operation; ``scope``, the one its key needs (``x-scope``), and ``also``, the scopes
    it needs besides (``x-also-scopes``)."""
    statuses = set(problems) | {500}
    if scope:
        # A key is checked against the database: while it is away, 503.
        statuses |= {401, 403, 503}
    if body is not None:
        statuses |= {400, 408, 413}
    if any(p["in"] == "query" for p in params or ()):
        statuses.add(400)
    responses: dict[str, Any] = {
        str(ok_status): {"description": "OK", "content": {ok_type: {"schema": ok or {}}}}
    }
    if links:
        responses[str(ok_status)]["links"] = links
    for status in sorted(statuses):
        answer: dict[str, Any] = {"description": _WHY[status], "content": _PROBLEM}
        if status == 401:
            answer["headers"] = {"WWW-Authenticate": {"schema": _STR, "required": True}}
        responses[str(status)] = answer
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if scope:
        op["security"] = [{"apiKey": []}]
        op["x-scope"] = scope
    if also:
        op["x-also-scopes"] = list(also)
    if body is not None:
        op["requestBody"] = {"required": True, "content": {body_type: {"schema": body}}}
    if params:
        op["parameters"] = params
    return op


def _query(name: str, schema: dict, description: str) -> dict:
    return {"name": name, "in": "query", "schema": schema, "description": description}


def _limit_query(most: int, what: str = "at most this many") -> dict:
    """The ``limit`` of a listing, as `bastion.server.problems.page_limit` reads it."""
    schema = {**_INT, "minimum": 1, "maximum": most}
    return _query("limit", schema, f"{what}, 1..{most} (default {DEFAULT_LIMIT})")


def _path(name: str, description: str) -> dict:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": _STR,
        "description": description,
    }


_DECIDED = {
    "decision_id": _STR,
    "sequence": _INT,
    # Present when the evaluation spent its budget: refused (allowed false, no results).
    # signal_stale and insufficient_scope: a chain (principals) refused by requires_signal or
    # requires_scope (with scopes given). suspended: the kill switch holds the actor (or a
    # principal of the chain, or the owner of an agent acting as itself), named by `suspended`.
    "reason": {
        "type": "string",
        "enum": ["evaluation_limit", "signal_stale", "insufficient_scope", "suspended"],
    },
    "limit": _STR,
    "suspended": {
        "type": "object",
        "required": ["type", "id"],
        "properties": {"type": _STR, "id": _STR},
        "description": "who the kill switch holds, when reason is suspended",
    },
}
_FRESH = (422, 503)  # at_least: a sequence no write has; not applied in time
_TO_DECISION = {
    "GetDecision": {
        "operationId": "getDecision",
        "parameters": {"decision_id": "$response.body#/decision_id"},
    }
}
_FIRST_APPROVAL = "$response.body#/approvals/0/id"
_NON_EMPTY = {"type": "array", "minItems": 1}
_TASK_ID_FIELD = {
    **_STR,
    "minLength": 1,
    "maxLength": tasks_api.MAX_ID_LENGTH,
    "pattern": suspensions_api.ID_PATTERN,
}
_SIGNAL_NAME = {
    **_STR,
    "minLength": 1,
    "maxLength": signals.MAX_NAME,
    "pattern": signals.NAME_PATTERN,
}

PATHS: dict[str, Any] = {
    "/v1/authorize": {
        "post": _op(
            "Is the actor allowed to do the action on the resource?",
            "decide",
            {
                "allOf": [
                    _response(
                        ["allowed", "decision_id", "sequence"],
                        allowed=_BOOL,
                        explanation=_ref("Explanation"),
                        **_DECIDED,
                    ),
                    _ref("ChainAnswer"),
                ]
            },
            body={
                "anyOf": [
                    {
                        **SCHEMAS[kind],
                        "properties": {
                            **SCHEMAS[kind]["properties"],
                            "at_least": _AT_LEAST,
                            "explain": {
                                **_nullable(_BOOL),
                                "description": "answer with the explanation too; it shows the"
                                " stored facts its proofs rest on, so the key needs facts:read"
                                " too (403 before anything is decided otherwise)",
                            },
                        },
                    }
                    for kind in ("Check", "ChainCheck")
                ]
            },
            problems=_FRESH,
            links=_TO_DECISION,
        )
    },
    "/v1/authorize/batch": {
        "post": _op(
            f"Many checks in one request (at most {MAX_BATCH}), decided in turn; other requests"
            " are served between them, and a change applied meanwhile is seen by the checks"
            " after it (each decision record has the sequence it was decided at; `sequence` is"
            " the latest)",
            "decide",
            _response(
                ["results", "sequence"],
                results={
                    "type": "array",
                    "items": {
                        "allOf": [
                            _response(["allowed", "decision_id"], allowed=_BOOL, decision_id=_STR),
                            _ref("ChainAnswer"),
                        ]
                    },
                },
                sequence=_INT,
            ),
            body=_request(
                ["checks"],
                checks={
                    "type": "array",
                    "items": {"anyOf": [_ref("Check"), _ref("ChainCheck")]},
                    "maxItems": MAX_BATCH,
                },
                context=_CTX,
                at_least=_AT_LEAST,
            ),
            problems=_FRESH,
        )
    },
    "/v1/list": {
        "post": _op(
            "Ids of the resources of a type the actor may act on (paginated)",
            "decide",
            _response(
                ["ids", "next_cursor", "decision_id", "sequence"],
                ids={"type": "array", "items": _STR},
                next_cursor=_nullable(_STR),
                **_DECIDED,
            ),
            body=_request(
                ["actor", "action", "resource_type"],
                actor=_ref("Entity"),
                action=_ACTION,
                resource_type={**_STR, "maxLength": MAX_ENTITY_TYPE},
                context=_CTX,
                limit=_nullable({**_INT, "minimum": 1, "maximum": MAX_LIST_PAGE}),
                cursor=_nullable(_STR),
                at_least=_AT_LEAST,
            ),
            problems=_FRESH,
            links=_TO_DECISION,
        )
    },
    "/v1/actions": {
        "post": _op(
            "Every action the actor may take on the resource",
            "decide",
            _response(
                ["actions", "decision_id", "sequence"],
                actions={"type": "array", "items": _STR},
                **_DECIDED,
            ),
            body=_request(
                ["actor", "resource"],
                actor=_ref("Entity"),
                resource=_ref("Entity"),
                context=_CTX,
                at_least=_AT_LEAST,
            ),
            problems=_FRESH,
            links=_TO_DECISION,
        )
    },
    "/v1/query": {
        "post": _op(
            'Solutions of a predicate; an argument {"var": "x"} is unbound. A fact predicate'
            " (stored facts) needs the scope facts:read besides decide.",
            "decide",
            _response(
                ["results", "decision_id", "sequence"],
                results={"type": "array", "items": {"type": "array"}},
                **_DECIDED,
            ),
            body=_request(
                ["predicate"],
                predicate=_STR,
                args=_nullable(
                    {
                        "type": "array",
                        "items": {
                            "anyOf": [
                                {
                                    "type": "object",
                                    "required": ["var"],
                                    "properties": {"var": _STR},
                                    "additionalProperties": False,
                                },
                                _ref("AskedEntityObject"),
                                _STR,
                                _BOOL,
                                _INT,
                            ]
                        },
                    }
                ),
                context=_CTX,
                at_least=_AT_LEAST,
            ),
            problems=_FRESH,
            links=_TO_DECISION,
        )
    },
    "/v1/decisions/{decision_id}": {
        "get": {
            **_op(
                "A recent decision of this server process that this key asked for (404: unknown,"
                " or another key's; an admin key reads every one)",
                "decide",
                _ref("Decision"),
                problems=(404,),
                params=[_path("decision_id", "the decision_id of a decision's answer")],
            ),
            "operationId": "getDecision",
        },
    },
    "/v1/decisions/{decision_id}/explanation": {
        "get": _op(
            "Why an authorize decision this key asked for came out as it did (404: unknown, or"
            " another key's; an admin key reads every one); it shows the stored facts its proofs"
            " rest on, so the key needs facts:read too",
            "decide",
            {
                "allOf": [
                    _ref("Decision"),
                    _response(
                        ["explanation", "exact"],
                        explanation=_ref("Explanation"),
                        exact=_BOOL,
                        explained_at_sequence=_INT,
                        explained_policy_version=_nullable(_INT),
                    ),
                ]
            },
            problems=(404, 409),
            params=[_path("decision_id", "the decision_id of an authorize answer")],
            also=("facts:read",),
        ),
    },
    "/v1/facts": {
        "get": _op(
            "Stored facts matching a pattern, a page at a time",
            "facts:read",
            _response(
                ["facts", "next_cursor"],
                facts={"type": "array", "items": _ref("StoredFact")},
                next_cursor=_nullable(_STR),
            ),
            params=[
                {
                    "name": "pattern",
                    "in": "query",
                    "content": {"application/json": {"schema": _ref("Pattern")}},
                    "description": "a Pattern as JSON",
                },
                _limit_query(MAX_FACTS_PAGE, "page size"),
                _query("cursor", _STR, "next_cursor of the previous page"),
            ],
            problems=(422,),
        ),
        "post": _op(
            "Insert facts",
            "facts:write",
            _ref("Write"),
            body=_request(
                ["facts"],
                facts={"type": "array", "items": _ref("Fact")},
                expires_at=_EXPIRES_AT,
            ),
            problems=(422,),
        ),
    },
    "/v1/facts/delete": {
        "post": _op(
            "Delete every fact matching any pattern",
            "facts:write",
            _ref("Write"),
            body=_request(["patterns"], patterns={"type": "array", "items": _ref("Pattern")}),
            problems=(422,),
        )
    },
    "/v1/facts/batch": {
        "post": _op(
            "Deletes then inserts, all or nothing; at least one of them",
            "facts:write",
            _ref("Write"),
            body={
                **_request(
                    [],
                    insert=_nullable({"type": "array", "items": _ref("Fact")}),
                    delete=_nullable({"type": "array", "items": _ref("Pattern")}),
                ),
                "anyOf": [
                    {"required": ["insert"], "properties": {"insert": _NON_EMPTY}},
                    {"required": ["delete"], "properties": {"delete": _NON_EMPTY}},
                ],
            },
            problems=(422,),
        )
    },
    "/v1/facts/import": {
        "post": _op(
            "Bulk import, one Fact per line (JSON lines); one transaction",
            "facts:write",
            _ref("Write"),
            body={
                "type": "array",
                "items": _ref("Fact"),
                "minItems": 1,
                "description": "each item is one line of the body",
            },
            body_type="application/x-ndjson",
            problems=(422,),
        )
    },
    "/v1/facts/export": {
        "get": _op(
            "Every live fact, one per line (JSON lines)",
            "facts:read",
            {"type": "array", "items": _ref("StoredFact"), "description": "each item is a line"},
            ok_type="application/x-ndjson",
        )
    },
    "/v1/policy": {
        "get": _op(
            "The policy in force",
            "policy:read",
            _response(
                ["version", "text", "source"],
                version=_nullable(_INT),
                text=_STR,
                source=_nullable(_STR),
                created_at=_NUM,
                created_by=_STR,
                note=_STR,
                applied=_nullable(_INT),
            ),
        ),
        "put": _op(
            "Validate and swap in a new policy; the old one stays if it fails",
            "policy:write",
            _response(
                ["version", "sequence", "warnings"],
                version=_INT,
                sequence=_INT,
                warnings={"type": "array", "items": _STR},
            ),
            body=_request(
                ["text"],
                text=_STR,
                source=_nullable(_STR),
                note=_nullable(_STR),
                strict=_STRICT,
            ),
            problems=(422,),
        ),
    },
    "/v1/policy/validate": {
        "post": _op(
            "Check a policy without applying it",
            "policy:read",
            _response(
                ["valid", "warnings"], valid=_BOOL, warnings={"type": "array", "items": _STR}
            ),
            body=_request(["text"], text=_STR, source=_nullable(_STR), strict=_STRICT),
            problems=(422,),
        )
    },
    "/v1/policy/versions": {
        "get": _op(
            "Every stored policy version",
            "policy:read",
            _response(["versions"], versions={"type": "array", "items": _ref("PolicyVersion")}),
        )
    },
    "/v1/policy/versions/{version}": {
        "get": _op(
            "A stored policy version with its text (a decision's policy_version)",
            "policy:read",
            {"allOf": [_ref("PolicyVersion"), _response(["text"], text=_STR)]},
            problems=(404,),
            params=[_path("version", "a policy version's number (1 or more)")],
        )
    },
    "/v1/policy/rollback": {
        "post": _op(
            "Put an earlier version back in force (as a new version)",
            "policy:write",
            _response(
                ["version", "sequence", "rolled_back_to"],
                version=_INT,
                sequence=_INT,
                rolled_back_to=_INT,
            ),
            body=_request(["version"], version={**_INT, "minimum": 1}),
            problems=(404, 422),
        )
    },
    "/v1/keys": {
        "get": _op(
            "API keys (never the keys themselves)",
            "admin",
            _response(["keys"], keys={"type": "array", "items": _ref("ApiKey")}),
        ),
        "post": _op(
            "Create an API key; the response is the only time it is shown",
            "admin",
            {"allOf": [_ref("ApiKey"), _response(["key"], key=_STR)]},
            ok_status=201,
            problems=(422,),
            body=_request(
                ["name", "scopes"],
                name={
                    **_STR,
                    "minLength": 1,
                    "maxLength": MAX_NAME_LENGTH,
                    "description": (
                        "printable, without surrounding spaces, not reading as another name"
                        " (no word mixing scripts, nothing NFKC changes, NFC): 422 otherwise"
                    ),
                },
                scopes={"type": "array", "items": {"enum": list(SCOPES)}, "minItems": 1},
                expires_in=_nullable(
                    {
                        "type": "number",
                        "exclusiveMinimum": 0,
                        "maximum": MAX_KEY_SECONDS,
                        "description": "seconds until the key expires; leave out for none",
                    }
                ),
            ),
            links={
                "RevokeKey": {
                    "operationId": "revokeKey",
                    "parameters": {"key_id": "$response.body#/id"},
                }
            },
        ),
    },
    "/v1/keys/{key_id}": {
        "delete": {
            **_op(
                "Revoke a key",
                "admin",
                _response(["id", "revoked"], id=_STR, revoked={"const": True}),
                problems=(404,),
                params=[_path("key_id", "the id of a key (GET /v1/keys)")],
            ),
            "operationId": "revokeKey",
        },
    },
    "/v1/approvals": {
        "get": _op(
            "Held calls and results, newest first",
            approvals_api.SCOPE,
            _response(["approvals"], approvals={"type": "array", "items": _ref("ApprovalRequest")}),
            params=[
                _query("status", {"enum": list(STATUSES)}, "only requests in this status"),
                _query(
                    "approver",
                    {**_STR, "minLength": 1, "maxLength": approvals_api.MAX_PERSON},
                    "only requests the policy named this person an approver of",
                ),
                _limit_query(approvals_api.MAX_PAGE),
            ],
            links={
                name: {"operationId": op, "parameters": {"request_id": _FIRST_APPROVAL}}
                for name, op in (
                    ("GetApproval", "getApproval"),
                    ("Approve", "approveRequest"),
                    ("Deny", "denyRequest"),
                )
            },
        )
    },
    "/v1/approvals/{request_id}": {
        "get": {
            **_op(
                "One held call or result: its arguments in full and its answers; with reviewer,"
                " a held result as that person may see it (masked for them by the policy), if"
                " they may review it now (403 says why not; 422 for a held call)",
                approvals_api.SCOPE,
                {
                    "allOf": [
                        _ref("ApprovalRequest"),
                        {
                            "type": "object",
                            "properties": {
                                "result": {
                                    "description": "with reviewer only: the held result as"
                                    " the reviewer may see it; null when none is held any more"
                                }
                            },
                        },
                    ]
                },
                problems=(404, 422),
                params=[
                    _path("request_id", "the id of an approval request"),
                    _query(
                        "reviewer",
                        {**_STR, "minLength": 1, "maxLength": approvals_api.MAX_PERSON},
                        "a person who may review this held result: include it, as they may see it",
                    ),
                ],
            ),
            "operationId": "getApproval",
        }
    },
    "/v1/approvals/{request_id}/approve": {
        "post": _op(
            "Approve a held call (once, or for some minutes), or release a held result (perhaps"
            " with fields withheld), as the person named in approver; the API key vouches for"
            " that person, the policy decides whether they may. 403 says why not.",
            approvals_api.SCOPE,
            _ref("ApprovalRequest"),
            body=_request(
                ["approver"],
                approver={**_STR, "minLength": 1, "maxLength": approvals_api.MAX_PERSON},
                minutes=_nullable(
                    {
                        **_INT,
                        "minimum": 0,
                        "description": "approve this tool for this many minutes (at most the"
                        " policy's approval_window); 0: this call only",
                    }
                ),
                reason=_nullable({**_STR, "maxLength": approvals_service.MAX_REASON}),
                withheld_fields=_nullable(
                    {
                        "type": "array",
                        "maxItems": approvals_service.MAX_WITHHELD,
                        "items": {
                            **_STR,
                            "minLength": 1,
                            "maxLength": approvals_service.MAX_PATH,
                        },
                        "description": "a review only: paths of the result to withhold, such"
                        ' as "customers.*.email"; one that matches nothing in the held result'
                        " as the reviewer may see it, or cannot be read, is refused (422,"
                        " naming it) and nothing is released",
                    }
                ),
            ),
            problems=(404, 422),
            params=[_path("request_id", "the id of an approval request")],
        )
        | {"operationId": "approveRequest"}
    },
    "/v1/approvals/{request_id}/deny": {
        "post": _op(
            "Deny a held call, or withhold a held result, as the person named in approver",
            approvals_api.SCOPE,
            _ref("ApprovalRequest"),
            body=_request(
                ["approver"],
                approver={**_STR, "minLength": 1, "maxLength": approvals_api.MAX_PERSON},
                reason=_nullable({**_STR, "maxLength": approvals_service.MAX_REASON}),
            ),
            problems=(404, 422),
            params=[_path("request_id", "the id of an approval request")],
        )
        | {"operationId": "denyRequest"}
    },
    "/v1/connections": {
        "get": _op(
            'Users\' connections to upstream MCP servers (auth = "per_user"), without tokens',
            connections_api.SCOPE,
            _response(["connections"], connections={"type": "array", "items": _ref("Connection")}),
            params=[
                _query(
                    "subject",
                    {**_STR, "minLength": 1, "maxLength": connections_api.MAX_NAME},
                    "only this user's",
                ),
                _query(
                    "upstream",
                    {**_STR, "minLength": 1, "maxLength": connections_api.MAX_NAME},
                    "only this upstream's",
                ),
            ],
        )
    },
    "/v1/connections/{subject}/{upstream}": {
        "delete": _op(
            "Revoke a user's connection: its tokens are deleted here and revoked at the"
            " upstream's authorization server when it offers RFC 7009 revocation (404: none)",
            connections_api.SCOPE,
            _response(
                ["revoked"],
                revoked=_response(["subject", "upstream"], subject=_STR, upstream=_STR),
            ),
            params=[
                {
                    **_path("subject", "the user"),
                    "schema": {**_STR, "minLength": 1, "maxLength": connections_api.MAX_NAME},
                },
                {
                    **_path("upstream", "the upstream's name"),
                    "schema": {**_STR, "minLength": 1, "maxLength": connections_api.MAX_NAME},
                },
            ],
            problems=(400, 404),
        )
    },
    **{
        path: ops
        for kind in ("tool", "prompt")
        for path, ops in {
            f"/v1/{kind}s": {
                "get": _op(
                    f"The {kind}s of upstreams with pin_{kind}s: each one's accepted definition,"
                    " and the one waiting for review with a short diff",
                    tools_api.SCOPE,
                    _response(
                        [f"{kind}s"], **{f"{kind}s": {"type": "array", "items": _ref("ToolPin")}}
                    ),
                    params=[
                        _query(
                            "server",
                            {**_STR, "minLength": 1, "maxLength": tools_api.MAX_NAME},
                            "only this upstream's",
                        ),
                        _query(
                            "pending", {"enum": ["true", "false"]}, "only those waiting for review"
                        ),
                    ],
                    problems=(404,),
                )
            },
            f"/v1/{kind}s/{{server}}/{{name}}/accept": {
                "post": _op(
                    f"Accept the definition of a {kind} waiting for review, named by its digest"
                    " (409: the upstream changed it again since, or nothing waits)",
                    tools_api.SCOPE,
                    _response(["accepted"], accepted=_ref("ToolPin")),
                    body=_request(["digest"], digest={**_STR, "pattern": tools_api.DIGEST_PATTERN}),
                    params=[
                        {
                            **_path("server", "the upstream's name"),
                            "schema": {**_STR, "minLength": 1, "maxLength": tools_api.MAX_NAME},
                        },
                        {
                            **_path("name", f"the {kind}'s name"),
                            "schema": {**_STR, "minLength": 1, "maxLength": tools_api.MAX_NAME},
                        },
                    ],
                    problems=(404, 409),
                )
            },
        }.items()
    },
    "/v1/suspensions": {
        "get": _op(
            "The suspensions in force (the kill switch)",
            suspensions_api.SCOPE,
            _response(["suspensions"], suspensions={"type": "array", "items": _ref("Suspension")}),
        ),
        "post": _op(
            "Suspend an agent (OAuth client id), a user or an MCP session: each of its calls"
            " through the gateway is refused (reason suspended) and its streams end, the token"
            " endpoint issues it no token (any grant; for a token exchange, any agent of the"
            " chain) and introspection answers active: false for its tokens, on every replica,"
            " until resumed or until expires_at (422: expires_at is not in the future). The"
            " decision API (/v1/authorize, AuthZEN) is not refused by it: it answers as the"
            " policy says, which may read the suspended facts once it declares them",
            suspensions_api.SCOPE,
            _response(["suspension", "sequence"], suspension=_ref("Suspension"), sequence=_INT),
            body=_request(
                ["kind", "id"],
                kind=_SUSPENSION_KIND,
                id=_SUSPENSION_ID,
                expires_at=_nullable(_NUM),
            ),
            ok_status=201,
            problems=(422,),
        ),
    },
    "/v1/suspensions/{kind}/{id}": {
        "delete": _op(
            "Resume: lift a suspension (404: there is none)",
            suspensions_api.SCOPE,
            _response(["resumed", "sequence"], resumed=_ref("Suspension"), sequence=_INT),
            params=[
                {**_path("kind", "agent, user or session"), "schema": _SUSPENSION_KIND},
                {**_path("id", "the suspended id"), "schema": _SUSPENSION_ID},
            ],
            problems=(400, 404),
        )
    },
    "/v1/agents": {
        "get": _op(
            "The agents (OAuth clients): owner, parent, name, purpose and status",
            agents_api.READ_SCOPE,
            _response(["agents"], agents={"type": "array", "items": _ref("Agent")}),
            params=[_query("status", {"enum": list(AGENT_STATUSES)}, "only agents of this status")],
            problems=(404,),
        ),
    },
    "/v1/agents/{client_id}": {
        "get": _op(
            "One agent (404: no such OAuth client)",
            agents_api.READ_SCOPE,
            _response(["agent"], agent=_ref("Agent")),
            params=[_path("client_id", "the agent's OAuth client id")],
            problems=(404,),
        ),
        "patch": _op(
            "Change an agent's owner, name, purpose or parent (parent null: none); an owner or"
            " parent is a fact, answered once this replica applies it (422: a value refused, a"
            " parent that is unknown or would loop)",
            agents_api.WRITE_SCOPE,
            _response(["agent", "sequence"], agent=_ref("Agent"), sequence=_nullable(_INT)),
            body={
                "type": "object",
                "minProperties": 1,
                "properties": {
                    "owner": _nullable({**_STR, "minLength": 1, "maxLength": 512}),
                    "name": _nullable({**_STR, "maxLength": 200}),
                    "purpose": _nullable({**_STR, "maxLength": MAX_PURPOSE_CHARS}),
                    "parent": _nullable({**_STR, "minLength": 1, "maxLength": 512}),
                },
                "additionalProperties": False,
            },
            params=[_path("client_id", "the agent's OAuth client id")],
            problems=(404, 422),
        ),
    },
    "/v1/signals": {
        "get": _op(
            "Live signals, of one subject and one name when asked",
            signals_api.SCOPE,
            _response(["signals"], signals={"type": "array", "items": _ref("Signal")}),
            params=[
                _query(
                    "subject",
                    {
                        **_STR,
                        "pattern": f"^({'|'.join(signals.SUBJECT_TYPES)}):[^\\u0000]"
                        f"{{1,{signals.MAX_SUBJECT_ID}}}$",
                    },
                    "only this subject's signals, as Type:id (User:sam, Device:d1)",
                ),
                _query("name", _SIGNAL_NAME, "only signals of this name"),
                _limit_query(signals_api.MAX_PAGE),
            ],
        ),
        "post": _op(
            "Set a signal about a user, device, agent or session, in place of its earlier value"
            " of that name; stored as an expiring signal fact (422: the policy in force cannot"
            " hold it, or ttl_seconds is above [signals.api].max_ttl_seconds)",
            signals_api.SCOPE,
            _response(["sequence", "signal"], sequence=_INT, signal=_ref("Signal")),
            body=_request(
                ["subject", "name", "value", "source"],
                subject=_ref("SignalSubject"),
                name=_SIGNAL_NAME,
                value=_ref("SignalValue"),
                source={**_SIGNAL_NAME, "maxLength": signals.MAX_SOURCE},
                ttl_seconds=_nullable(
                    {
                        **_INT,
                        "minimum": 1,
                        "description": "seconds it lives (default [signals.api]."
                        "default_ttl_seconds; at most max_ttl_seconds)",
                    }
                ),
            ),
            problems=(422,),
        ),
    },
    "/v1/signals/clear": {
        "post": _op(
            "Clear a subject's signal of this name, or all its signals without a name",
            signals_api.SCOPE,
            _response(["sequence", "cleared"], sequence=_INT, cleared=_INT),
            body=_request(["subject"], subject=_ref("SignalSubject"), name=_nullable(_SIGNAL_NAME)),
        )
    },
    "/v1/alerts": {
        "get": _op(
            "Alerts, most recently raised first",
            alerts_api.SCOPE,
            _response(["alerts"], alerts={"type": "array", "items": _ref("Alert")}),
            params=[
                _query("state", {"enum": ["open", "acknowledged"]}, "only alerts in this state"),
                _limit_query(alerts_api.MAX_PAGE),
            ],
            links={
                name: {"operationId": op, "parameters": {"alert_id": "$response.body#/alerts/0/id"}}
                for name, op in (("GetAlert", "getAlert"), ("Acknowledge", "acknowledgeAlert"))
            },
        )
    },
    "/v1/alerts/{alert_id}": {
        "get": _op(
            "One alert",
            alerts_api.SCOPE,
            _ref("Alert"),
            problems=(404,),
            params=[_path("alert_id", "the id of an alert")],
        )
        | {"operationId": "getAlert"}
    },
    "/v1/alerts/{alert_id}/acknowledge": {
        "post": _op(
            "Acknowledge an alert as the person named in by (the API key vouches for them): it"
            " is not escalated any further; 409 if it was acknowledged already; 403, saying why,"
            " if the alert is about them and [signals.alerts] owner_may_acknowledge is false",
            alerts_api.SCOPE,
            _ref("Alert"),
            body=_request(["by"], by={**_STR, "minLength": 1, "maxLength": alerts_api.MAX_PERSON}),
            problems=(404, 409, 422),
            params=[_path("alert_id", "the id of an alert")],
        )
        | {"operationId": "acknowledgeAlert"}
    },
    "/v1/labels/clear": {
        "post": _op(
            "Forget session labels (docs/delegation.md): with user and agent (the first agent of"
            " a chain) and optionally task, that label set; with task alone, every label set of"
            " the task. cleared: how many sets were forgotten. 404: no gateway; 503: the shared"
            " store (Redis) cannot be reached",
            labels_api.SCOPE,
            _response(["cleared"], cleared={**_INT, "minimum": 0}),
            body={
                "oneOf": [
                    {
                        "type": "object",
                        "required": ["user", "agent"],
                        "properties": {
                            "user": _LABEL_ID,
                            "agent": _LABEL_ID,
                            "task": _nullable({**_LABEL_ID, "minLength": 0}),
                        },
                        "additionalProperties": False,
                    },
                    {
                        "type": "object",
                        "required": ["task"],
                        "properties": {"task": _LABEL_ID},
                        "additionalProperties": False,
                    },
                ]
            },
            problems=(404,),
        )
    },
    "/v1/tasks": {
        "get": _op(
            "Tasks, newest first: the key's own (an admin key's: all)",
            tasks_api.SCOPE,
            _response(["tasks"], tasks={"type": "array", "items": _ref("Task")}),
            params=[
                _query("status", {"enum": list(TASK_STATUSES)}, "only tasks in this status"),
                _limit_query(tasks_api.MAX_PAGE),
            ],
            links={
                name: {"operationId": op, "parameters": {"task_id": "$response.body#/tasks/0/id"}}
                for name, op in (("GetTask", "getTask"), ("EndTask", "endTask"))
            },
        ),
        "post": _op(
            "Open a just-in-time task: the agent may act for the user with these grants until"
            " the expiry (expires_in or expires_at, one of them, at most [tasks].max_seconds"
            " ahead); the facts are written with that expiry (403: a fact for anyone but the"
            " task's agent, or of a predicate tasks may not grant; 422: an expiry past the cap"
            " or gone, a fact the policy cannot use or the store holds already)",
            tasks_api.SCOPE,
            _response(["task"], task=_ref("Task")),
            body={
                **_request(
                    ["user", "agent", "purpose", "facts"],
                    user=_TASK_ID_FIELD,
                    agent=_TASK_ID_FIELD,
                    purpose={**_STR, "minLength": 1, "maxLength": tasks_api.MAX_PURPOSE_LENGTH},
                    facts={**_NON_EMPTY, "items": _ref("TaskFact")},
                    expires_in={**_NUM, "description": "seconds from now"},
                    expires_at={**_NUM, "description": "epoch seconds"},
                ),
                "oneOf": [{"required": ["expires_in"]}, {"required": ["expires_at"]}],
            },
            ok_status=201,
            problems=(403, 422),
        ),
    },
    "/v1/tasks/{task_id}": {
        "get": _op(
            "One task (404: unknown, or another key's)",
            tasks_api.SCOPE,
            _response(["task"], task=_ref("Task")),
            problems=(404,),
            params=[_path("task_id", "the id of a task")],
        )
        | {"operationId": "getTask"}
    },
    "/v1/tasks/{task_id}/end": {
        "post": _op(
            "End a task: its facts are deleted and every OAuth grant bound to it revoked, at"
            " once; ended is false when it had ended or expired already (404: unknown, or"
            " another key's)",
            tasks_api.SCOPE,
            _response(["task", "ended"], task=_ref("Task"), ended=_BOOL),
            body=_request(
                [], reason={**_STR, "minLength": 1, "maxLength": tasks_api.MAX_REASON_LENGTH}
            ),
            problems=(404, 422),
            params=[_path("task_id", "the id of a task")],
        )
        | {"operationId": "endTask"}
    },
    "/v1/openapi.json": {"get": _op("This document", None, {"type": "object"})},
    "/healthz": {
        "get": _op("The process is alive", None, _response(["status"], status={"const": "ok"}))
    },
    "/readyz": {
        "get": {
            **_op(
                "Facts are loaded, the change log is followed, the facts are current",
                None,
                _response(
                    ["ready", "sequence", "lag", "policy_version", "facts", "staleness_seconds"],
                    ready=_BOOL,
                    sequence=_INT,
                    lag=_INT,
                    policy_version=_nullable(_INT),
                    facts=_INT,
                    staleness_seconds=_NUM,
                    reason={
                        **_STR,
                        "description": "why not ready: loading, facts_stale,"
                        " change_log_unreadable or not_listening, then the details",
                    },
                    ssf_streams={
                        "type": "object",
                        "description": "with [signals.ssf]: each transmitter's stream as this"
                        " process last saw it ({status, detail}); not counted in `ready`",
                        "additionalProperties": {
                            "type": "object",
                            "properties": {"status": _STR, "detail": _STR},
                        },
                    },
                ),
            ),
        }
    },
    "/metrics": {"get": _op("Prometheus metrics", None, _STR, ok_type="text/plain")},
}
# Not ready is an answer of its own, in the same form as ready.
PATHS["/readyz"]["get"]["responses"]["503"] = {
    "description": "not ready; `reason` says why",
    "content": {
        "application/json": {
            "schema": PATHS["/readyz"]["get"]["responses"]["200"]["content"]["application/json"][
                "schema"
            ]
        }
    },
}

# Ending a task needs no reason: the body may be left out.
PATHS["/v1/tasks/{task_id}/end"]["post"]["requestBody"]["required"] = False

# An answer is refused, too, when the person may not give it.
for _verb in ("approve", "deny"):
    PATHS[f"/v1/approvals/{{request_id}}/{_verb}"]["post"]["responses"]["403"] = {
        "description": "the key lacks the scope approvals, or the person may not give this"
        " answer; the detail says why (not an approver under the policy, already answered, no"
        " longer pending, expired, a longer time than the policy allows)",
        "content": _PROBLEM,
    }


# -- AuthZEN Authorization API 1.0 (bastion.server.api.authzen, docs/authzen.md) ----------------
# Its errors are an error message string (the spec's "Error Responses"), not problem details.

_AZ_ERRORS = {
    **_WHY,
    400: "malformed: a required field missing or of the wrong type, an object that names a"
    " member twice, or not sent as application/json",
    403: "the key lacks the scope authzen",
    404: "not this PDP's metadata path: with a public_url that has a path, the metadata is at"
    " /.well-known/authzen-configuration followed by that path (RFC 8615), named in the message",
    413: "the request body is larger than max_body_bytes",
    422: "a page token this search cannot continue from (issued for another request), or a"
    " subject search the policy in force cannot answer",
    500: "an unexpected failure",
    503: "the database is unavailable (keys are checked there), or this replica's facts are"
    " stale; retry",
}
_PROPERTIES = _nullable(
    {"type": "object", "additionalProperties": _ref("JsonValue"), "description": "attributes"}
)
_AZ_CONTEXT = _nullable(
    {
        "type": "object",
        "description": "the environment; the policy reads it as context, with the subject's,"
        " resource's and action's properties under context.subject, context.resource and"
        " context.action (so the context may not use those names); context.scopes: the token"
        " scopes the subject holds, for requires_scope",
        "propertyNames": {"not": {"enum": ["subject", "resource", "action"]}},
        "properties": {
            "scopes": _nullable(
                {"anyOf": [_STR, {"type": "array", "items": _STR}]},
            )
        },
        "additionalProperties": _ref("JsonValue"),
    }
)


def _az_entity(id_required: bool) -> dict:
    return {
        "type": "object",
        "required": ["type", "id"] if id_required else ["type"],
        "properties": {
            "type": _ENTITY_TYPE,
            "id": _ENTITY_ID
            if id_required
            else {"allOf": [_ref("JsonValue")], "description": "ignored: what the search finds"},
            "properties": _PROPERTIES,
        },
        "additionalProperties": _ref("JsonValue"),
    }


SCHEMAS.update(
    {
        "AuthzenEntity": _az_entity(True),
        "AuthzenAction": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": _ACTION, "properties": _PROPERTIES},
            "additionalProperties": _ref("JsonValue"),
        },
        "AuthzenDecision": _response(
            ["decision"],
            decision=_BOOL,
            context={
                "type": "object",
                "description": "present when there is something to say: obligations (the"
                " AuthZEN Obligations Profile's shape), the reason bastion refused, or the"
                " error of a batch item that could not be read",
            },
        ),
    }
)
_AZ_ENTITY, _AZ_ACTION = _ref("AuthzenEntity"), _ref("AuthzenAction")
_AZ_EVALUATION = _request(
    ["subject", "action", "resource"],
    subject=_AZ_ENTITY,
    action=_AZ_ACTION,
    resource=_AZ_ENTITY,
    context=_AZ_CONTEXT,
    at_least=_AT_LEAST,
)
# /access/v1/evaluations without evaluations: one Access Evaluation.
_AZ_SINGLE = {
    **_AZ_EVALUATION,
    "properties": {
        **_AZ_EVALUATION["properties"],
        "evaluations": _nullable({"type": "array", "maxItems": 0}),
    },
}
# Any item is answered: one that is not an evaluation (an object of subject, action, resource
# and context, each defaulting to the top-level one) is answered false with its error.
_AZ_ITEM = {
    "allOf": [_ref("JsonValue")],
    "description": "an evaluation: {subject, action, resource, context}, each optional where"
    " the top level gives it; anything else is answered false, with the error in its context",
}
_AZ_BATCH = _request(
    ["evaluations"],
    subject=_nullable(_AZ_ENTITY),
    action=_nullable(_AZ_ACTION),
    resource=_nullable(_AZ_ENTITY),
    context=_AZ_CONTEXT,
    at_least=_AT_LEAST,
    options=_nullable(
        {
            "type": "object",
            "properties": {
                "evaluations_semantic": {
                    "enum": ["execute_all", "deny_on_first_deny", "permit_on_first_permit"]
                }
            },
            "additionalProperties": _ref("JsonValue"),
        }
    ),
    evaluations={
        "type": "array",
        "items": _AZ_ITEM,
        "minItems": 1,
        "maxItems": 1000,
        "description": "at most authzen_max_evaluations (1000 by default); an item without"
        " subject, action or resource takes the top-level one, else it is answered false with"
        " its error",
    },
)


def _az_search(kind: str) -> dict:
    fields: dict[str, Any] = {
        "subject": _az_entity(kind != "subject"),
        "resource": _az_entity(kind != "resource"),
    }
    if kind != "action":
        fields["action"] = _AZ_ACTION
    page = {
        "type": "object",
        "properties": {
            "limit": _nullable({**_INT, "minimum": 0}),
            "token": _nullable({**_STR, "description": "next_token of the previous page"}),
            "properties": _nullable(
                {
                    "type": "object",
                    "description": "changes no result (bastion declares no pagination"
                    " capability); must be the same on every page of a search",
                }
            ),
        },
        "additionalProperties": _ref("JsonValue"),
    }
    return _request(
        sorted(fields), **fields, context=_AZ_CONTEXT, at_least=_AT_LEAST, page=_nullable(page)
    )


def _az_op(summary: str, ok: dict, body: dict | None, problems: tuple[int, ...] = ()) -> dict:
    responses: dict[str, Any] = {
        "200": {"description": "OK", "content": {"application/json": {"schema": ok}}}
    }
    statuses = {500, *problems} if body is None else {400, 401, 403, 408, 413, 500, 503, *problems}
    for status in sorted(statuses):
        answer: dict[str, Any] = {
            "description": _AZ_ERRORS[status],
            "content": {"text/plain": {"schema": _STR}},
        }
        if status == 401:
            answer["headers"] = {"WWW-Authenticate": {"schema": _STR, "required": True}}
        responses[str(status)] = answer
    op: dict[str, Any] = {"summary": summary, "tags": ["AuthZEN"], "responses": responses}
    if body is not None:
        op["security"] = [{"apiKey": []}]
        op["x-scope"] = "authzen"
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return op


_AZ_RESULTS = {
    "page": _response(["next_token"], next_token=_STR, count=_INT, total=_INT),
    "context": {
        "type": "object",
        "description": "why bastion refused (evaluation_limit, or suspended: the kill switch)",
    },
}
_AZ_METADATA = _az_op(
    "AuthZEN PDP metadata (public)",
    _response(
        ["policy_decision_point", "access_evaluation_endpoint"],
        policy_decision_point=_STR,
        access_evaluation_endpoint=_STR,
        access_evaluations_endpoint=_STR,
        search_subject_endpoint=_STR,
        search_resource_endpoint=_STR,
        search_action_endpoint=_STR,
        supported_obligations={"type": "array", "items": _STR},
    ),
    None,
    (404,),
)
PATHS.update(
    {
        "/.well-known/authzen-configuration": {"get": _AZ_METADATA},
        # A PDP whose identifier (public_url) has a path: its metadata is under that path.
        "/.well-known/authzen-configuration/{tail}": {
            "get": {
                **_AZ_METADATA,
                "parameters": [_path("tail", "the path of the PDP's identifier (public_url)")],
            }
        },
        "/access/v1/evaluation": {
            "post": _az_op(
                "AuthZEN Access Evaluation: may the subject do the action on the resource?",
                _ref("AuthzenDecision"),
                _AZ_EVALUATION,
                _FRESH,
            )
        },
        "/access/v1/evaluations": {
            "post": _az_op(
                "AuthZEN Access Evaluations: many questions, in order, as evaluations_semantic"
                " says; without evaluations, one Access Evaluation",
                {
                    "anyOf": [
                        _response(
                            ["evaluations"],
                            evaluations={"type": "array", "items": _ref("AuthzenDecision")},
                        ),
                        _ref("AuthzenDecision"),
                    ]
                },
                {"anyOf": [_AZ_BATCH, _AZ_SINGLE]},
                _FRESH,
            )
        },
        **{
            f"/access/v1/search/{kind}": {
                "post": _az_op(
                    f"AuthZEN {kind.capitalize()} Search: every permitted {kind}, paginated",
                    _response(
                        ["results"],
                        **_AZ_RESULTS,
                        results={
                            "type": "array",
                            "items": _response(["name"], name=_STR)
                            if kind == "action"
                            else _response(["type", "id"], type=_STR, id=_STR),
                        },
                    ),
                    _az_search(kind),
                    _FRESH,
                )
            }
            for kind in ("subject", "resource", "action")
        },
    }
)


# A string that holds no NUL (an ECMA-262 pattern, as JSON Schema's are).
NO_NUL = "^[^\\u0000]*$"


def _text_only(schema: Any) -> Any:
    """``schema`` with `NO_NUL` on each string schema that has no pattern, enum or const of its
    own, and on the keys of each object that may have keys beyond its properties; an object or
    an array that says nothing of its other members' values holds `JsonValue`s."""
    if not isinstance(schema, dict) or "$ref" in schema:
        return schema
    out = dict(schema)
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if key in out:
            out[key] = [_text_only(s) for s in out[key]]
    for key in ("items", "not", "additionalProperties", "propertyNames"):
        if isinstance(out.get(key), dict):
            out[key] = _text_only(out[key])
    if "properties" in out:
        out["properties"] = {name: _text_only(s) for name, s in out["properties"].items()}
    types = out.get("type", ())
    types = (types,) if isinstance(types, str) else types
    if "string" in types and not {"pattern", "enum", "const"} & out.keys():
        out["pattern"] = NO_NUL
    if "object" in types and out.setdefault("additionalProperties", _ref("JsonValue")):
        names = out.get("propertyNames", {})
        if "pattern" not in names:
            out["propertyNames"] = {**names, "pattern": NO_NUL}
    if "array" in types:
        out.setdefault("items", _ref("JsonValue"))
    return out


def _schemas_text_only(node: Any) -> Any:
    """``node`` of the document's paths, with `_text_only` on each schema in it."""
    if isinstance(node, dict):
        return {
            k: _text_only(v) if k == "schema" else _schemas_text_only(v) for k, v in node.items()
        }
    if isinstance(node, list):
        return [_schemas_text_only(v) for v in node]
    return node


@cache
def openapi_document() -> dict:
    from bastion.server import openapi_oso_cloud as oso

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "bastion decision service",
            "version": "1",
            "description": "Policy decisions, facts, policy versions, API keys, approvals,"
            " signals, suspensions, alerts and tasks; the OpenID AuthZEN Authorization API"
            " 1.0; and Oso Cloud's API as the oso-cloud SDK calls it (/api). No string or key"
            " of a request may hold U+0000 (NUL): every route refuses it (400).",
        },
        "paths": _schemas_text_only({**PATHS, **oso.PATHS}),
        "components": {
            "schemas": {name: _text_only(s) for name, s in {**SCHEMAS, **oso.SCHEMAS}.items()},
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        },
    }
