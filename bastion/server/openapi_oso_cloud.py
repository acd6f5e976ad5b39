"""The `/api` paths of the OpenAPI document: Oso Cloud's API as the ``oso-cloud`` SDK calls it
(`bastion.server.api.oso_cloud`) and its agent events (`bastion.server.api.oso_agents`).

Errors there are Oso Cloud's ``{"message": ...}``, not problem details: the SDK raises them as
``OsoException`` with that text.
"""

from __future__ import annotations

from typing import Any

from bastion.facts.store import MAX_ENTITY_ID, MAX_ENTITY_TYPE, MAX_STRING
from bastion.server.api.oso_agents import EVENTS, KINDS, MAX_NAME, MAX_USERS
from bastion.server.api.oso_cloud import READ, WRITE

_STR = {"type": "string"}
_NAME = {"type": "string", "minLength": 1}
_ANY = {"$ref": "#/components/schemas/JsonValue"}
# The actor and resource of a question: at most what a fact can hold (`check_entity_size`).
_ASKED_TYPE = {**_NAME, "maxLength": MAX_ENTITY_TYPE}
_ASKED_ID = {**_STR, "maxLength": MAX_ENTITY_ID}
_ACTION = {**_STR, "maxLength": MAX_STRING}


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


def _object(required: list[str], *, closed: bool = False, **props: Any) -> dict:
    out: dict[str, Any] = {"type": "object", "required": required, "properties": props}
    out["additionalProperties"] = False if closed else _ANY
    return out


SCHEMAS: dict[str, Any] = {
    "OsoValue": {
        "description": "a value: type String, Integer (id: digits) or Boolean (id: true or"
        " false), or any other type for an entity",
        **_object(["type", "id"], closed=True, type=_NAME, id=_STR),
    },
    "OsoFact": _object(
        ["predicate", "args"],
        predicate=_STR,
        args={"type": "array", "items": {"$ref": "#/components/schemas/OsoValue"}},
    ),
    "OsoPattern": _object(
        ["predicate", "args"],
        predicate=_STR,
        args={
            "type": "array",
            "items": {
                "description": "null type and id: anything; a type and a null id: any value of"
                " that type",
                **_object([], closed=True, type=_nullable(_NAME), id=_nullable(_STR)),
            },
        },
    ),
    "OsoMessage": _object(["message"], message=_STR),
}

_CONTEXT_FACTS = _nullable(
    {
        "type": "array",
        "items": {"$ref": "#/components/schemas/OsoFact"},
        "description": "facts that hold for this question only, never stored (at most"
        " oso_api_max_context_facts)",
    }
)
_WHY = {
    400: "malformed: the request does not match this document",
    401: "no API key, or an unknown, expired or revoked one",
    403: "the key lacks the scope this operation needs",
    408: "the request body did not arrive within body_timeout",
    413: "the request body is larger than max_body_bytes",
    422: "well formed, but refused by the policy in force (an undeclared type, a fact it has no"
    " use for, a policy that does not load) or past a limit (oso_api_max_results,"
    " oso_api_max_context_facts); the message says which",
    404: "local authorization is not served by bastion (it needs the application's database)",
    500: "an unexpected failure",
    503: "the database is unavailable, or this replica's facts are stale",
}


def _op(
    summary: str,
    scope: str,
    ok: dict,
    *,
    body: dict | None = None,
    params: list | None = None,
    problems: tuple[int, ...] = (422,),
) -> dict:
    statuses = {401, 403, 500, 503, *problems}
    if body is not None:
        statuses |= {400, 408, 413}
    if params:
        statuses.add(400)
    responses: dict[str, Any] = {
        "200": {"description": "OK", "content": {"application/json": {"schema": ok}}}
    }
    for status in sorted(statuses):
        # Problem details where bastion answers before the /api handler runs (body limits,
        # an unexpected failure, the database away); Oso's message otherwise.
        content = {
            "application/json": {"schema": {"$ref": "#/components/schemas/OsoMessage"}},
            "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}},
        }
        answer: dict[str, Any] = {"description": _WHY[status], "content": content}
        if status == 401:
            answer["headers"] = {"WWW-Authenticate": {"schema": _STR, "required": True}}
        responses[str(status)] = answer
    op: dict[str, Any] = {
        "summary": summary,
        "tags": ["Oso Cloud API"],
        "responses": responses,
        "security": [{"apiKey": []}],
        "x-scope": scope,
    }
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if params:
        op["parameters"] = params
    return op


def _query(name: str, schema: dict, description: str, required: bool = False) -> dict:
    out = {"name": name, "in": "query", "schema": schema, "description": description}
    if required:
        out["required"] = True
    return out


_QUESTION = {"actor_type": _ASKED_TYPE, "actor_id": _ASKED_ID, "context_facts": _CONTEXT_FACTS}
_FACT_ARGS = [
    _query(f"args.{i}.{part}", _NAME if part == "type" else _STR, f"argument {i}'s {part}")
    for i in range(5)
    for part in ("type", "id")
]
_EVENT = {
    "agent_id": {"type": "string", "minLength": 1, "maxLength": MAX_NAME},
    "session_id": _STR,
    "users": _nullable(
        {
            "type": "array",
            "maxItems": MAX_USERS,
            "items": {
                "description": "a user, as an OsoValue whose id is 1 to 256 characters",
                **_object(
                    ["type", "id"],
                    closed=True,
                    type=_NAME,
                    id={"type": "string", "minLength": 1, "maxLength": MAX_NAME},
                ),
            },
        }
    ),
}
_TOOL = {"type": "string", "minLength": 1, "maxLength": MAX_NAME}
_EVENT_BODIES = {
    "tool_call_request": _object(
        ["agent_id", "session_id", "tool_name", "tool_parameters"],
        **_EVENT,
        tool_name=_TOOL,
        tool_parameters={"type": "object", "additionalProperties": _ANY},
        destructive=_nullable({"type": "boolean"}),
    ),
    "tool_call_response": _object(
        ["agent_id", "session_id", "tool_name", "tool_result"],
        **_EVENT,
        tool_name=_TOOL,
        tool_result=_ANY,
    ),
    "tool_call_error": _object(["agent_id", "session_id", "tool_name"], **_EVENT, tool_name=_TOOL),
    "message_from_user": _object(["agent_id", "session_id", "message"], **_EVENT, message=_STR),
    "message_to_user": _object(["agent_id", "session_id", "message"], **_EVENT, message=_STR),
}
assert set(_EVENT_BODIES) == set(KINDS)

PATHS: dict[str, Any] = {
    "/api/authorize": {
        "post": _op(
            "Oso: is the actor allowed to do the action on the resource? (oso.authorize)",
            READ,
            _object(["allowed"], allowed={"type": "boolean"}),
            body=_object(
                ["actor_type", "actor_id", "action", "resource_type", "resource_id"],
                **_QUESTION,
                action=_ACTION,
                resource_type=_ASKED_TYPE,
                resource_id=_ASKED_ID,
            ),
        )
    },
    "/api/list": {
        "post": _op(
            "Oso: ids of the resources of a type the actor may act on, a page at a time (oso.list)",
            READ,
            _object(
                ["results", "next_page_token"],
                results={"type": "array", "items": _STR},
                next_page_token=_nullable(_STR),
            ),
            body=_object(
                ["actor_type", "actor_id", "action", "resource_type"],
                **_QUESTION,
                action=_ACTION,
                resource_type={**_STR, "maxLength": MAX_ENTITY_TYPE},
                page_size=_nullable({"type": "integer", "minimum": 1, "maximum": 2**63 - 1}),
                page_token=_nullable(_STR),
            ),
        )
    },
    "/api/actions": {
        "post": _op(
            "Oso: every action the actor may take on the resource (oso.actions)",
            READ,
            _object(["results"], results={"type": "array", "items": _STR}),
            body=_object(
                ["actor_type", "actor_id", "resource_type", "resource_id"],
                **_QUESTION,
                resource_type=_ASKED_TYPE,
                resource_id=_ASKED_ID,
            ),
        )
    },
    "/api/evaluate_query": {
        "post": _op(
            "Oso: the solutions of a query (oso.build_query(...).evaluate(...))",
            READ,
            _object(
                ["results"],
                results={
                    "type": "array",
                    "items": {"type": "object", "additionalProperties": _nullable(_STR)},
                },
            ),
            body=_object(
                ["predicate"],
                predicate={
                    "type": "array",
                    "prefixItems": [_STR, {"type": "array", "items": _STR}],
                    "minItems": 2,
                    "maxItems": 2,
                },
                calls=_nullable(
                    {
                        "type": "array",
                        "items": {
                            "type": "array",
                            "prefixItems": [_STR, {"type": "array", "items": _STR}],
                            "minItems": 2,
                            "maxItems": 2,
                        },
                    }
                ),
                constraints=_nullable(
                    {
                        "type": "object",
                        "additionalProperties": _object(
                            ["type"],
                            type=_NAME,
                            ids=_nullable({"type": "array", "items": _STR}),
                        ),
                    }
                ),
                context_facts=_CONTEXT_FACTS,
            ),
        )
    },
    "/api/facts": {
        "get": _op(
            "Oso: stored facts that fit a pattern (oso.get); arguments left out are anything",
            READ,
            {"type": "array", "items": {"$ref": "#/components/schemas/OsoFact"}},
            params=[_query("predicate", _STR, "the fact's predicate", required=True)] + _FACT_ARGS,
        )
    },
    "/api/batch": {
        "post": _op(
            "Oso: insert facts and delete patterns, in order, as one transaction (oso.insert,"
            " oso.delete, oso.batch)",
            WRITE,
            {"$ref": "#/components/schemas/OsoMessage"},
            body={
                "type": "array",
                "items": {
                    "oneOf": [
                        _object(
                            ["inserts"],
                            closed=True,
                            inserts={
                                "type": "array",
                                "items": {"$ref": "#/components/schemas/OsoFact"},
                            },
                        ),
                        _object(
                            ["deletes"],
                            closed=True,
                            deletes={
                                "type": "array",
                                "items": {"$ref": "#/components/schemas/OsoPattern"},
                            },
                        ),
                    ]
                },
            },
        )
    },
    "/api/policy": {
        "get": _op(
            "Oso: the policy in force",
            READ,
            _object(
                ["policy"],
                policy=_nullable(_object(["filename", "src"], filename=_STR, src=_STR)),
            ),
            problems=(),
        ),
        "post": _op(
            "Oso: check a policy and put it in force (oso.policy)",
            WRITE,
            {"$ref": "#/components/schemas/OsoMessage"},
            body=_object(["src"], src=_STR, filename=_nullable(_STR)),
        ),
    },
    "/api/policy_metadata": {
        "get": _op(
            "Oso: roles, permissions and relations of each block of the policy in force"
            " (oso.get_policy_metadata)",
            READ,
            _object(
                ["metadata"],
                metadata=_object(
                    ["resources"],
                    resources={
                        "type": "object",
                        "additionalProperties": _object(
                            ["roles", "permissions", "relations"],
                            roles={"type": "array", "items": _STR},
                            permissions={"type": "array", "items": _STR},
                            relations={"type": "object", "additionalProperties": _STR},
                        ),
                    },
                ),
            ),
            problems=(),
        )
    },
    **{
        f"/api/agents/event/{kind}": {
            "post": _op(
                f"Oso for agents: a {kind.replace('_', ' ')} event (feeds the behaviour"
                " counters; no text is kept)",
                EVENTS,
                {"$ref": "#/components/schemas/OsoMessage"},
                body=body,
            )
        }
        for kind, body in _EVENT_BODIES.items()
    },
    **{
        f"/api/{name}": {
            "post": _op(
                "Oso: local authorization, which needs the application's database: refused"
                " (404, with a message)",
                READ,
                {"$ref": "#/components/schemas/OsoMessage"},
                body={"type": "object", "additionalProperties": _ANY},
                problems=(404,),
            )
        }
        for name in ("authorize_query", "list_query", "actions_query", "evaluate_query_local")
    },
}
