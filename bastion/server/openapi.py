"""The OpenAPI 3.1 document of the `/v1` API, served at ``/v1/openapi.json``."""

from __future__ import annotations

from functools import cache
from typing import Any


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: list[str], **props: Any) -> dict:
    return {"type": "object", "required": required, "properties": props}


_ARRAY = {"type": "array"}
_STR = {"type": "string"}
_INT = {"type": "integer"}
_BOOL = {"type": "boolean"}
_NUM = {"type": "number"}
_CTX = {"type": "object", "description": "live attributes of the request, read by the policy"}
_AT_LEAST = {
    "type": "integer",
    "description": "a sequence returned by a write: wait (bounded) until it is reflected",
}

SCHEMAS: dict[str, Any] = {
    "Entity": {
        "oneOf": [
            _obj(["type", "id"], type=_STR, id=_STR),
            {"type": "string", "description": 'short form "Type:id"'},
        ]
    },
    "Fact": _obj(
        ["predicate"],
        predicate=_STR,
        args={
            "type": "array",
            "items": {"oneOf": [_ref("Entity"), _STR, _INT, _BOOL]},
        },
        expires_at={**_NUM, "description": "epoch seconds; the fact stops counting then"},
    ),
    "Pattern": {**_ref("Fact"), "description": "a fact where null matches any value"},
    "Check": _obj(
        ["actor", "action", "resource"],
        actor=_ref("Entity"),
        action=_STR,
        resource=_ref("Entity"),
        context=_CTX,
    ),
    "Write": _obj(["sequence"], sequence=_INT, inserted=_INT, deleted=_INT),
    "Problem": _obj(
        ["title", "status", "detail"],
        type=_STR,
        title=_STR,
        status=_INT,
        detail={**_STR, "description": "what went wrong and what to fix"},
    ),
}


def _op(
    summary: str,
    scope: str | None,
    body: dict | None = None,
    response: dict | None = None,
    *,
    content_type: str = "application/json",
    params: list | None = None,
) -> dict:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {
            "200": {
                "description": "OK",
                "content": {
                    content_type if body is None else "application/json": {"schema": response or {}}
                },
            },
            "4XX": {
                "description": "a problem the caller can fix",
                "content": {"application/problem+json": {"schema": _ref("Problem")}},
            },
        },
    }
    if scope:
        op["security"] = [{"apiKey": []}]
        op["x-scope"] = scope
        op["responses"]["503"] = {
            "description": "the database is unavailable, or this replica's facts are stale or"
            " behind at_least; retry (Retry-After)",
            "content": {"application/problem+json": {"schema": _ref("Problem")}},
        }
    if body is not None:
        op["requestBody"] = {"required": True, "content": {content_type: {"schema": body}}}
    if params:
        op["parameters"] = params
    return op


def _q(name: str, schema: dict, description: str) -> dict:
    return {"name": name, "in": "query", "schema": schema, "description": description}


_DECISION = {
    "decision_id": _STR,
    "sequence": _INT,
    # Present when the evaluation spent its budget: refused (allowed false, no results).
    "reason": {"type": "string", "enum": ["evaluation_limit"]},
    "limit": _STR,
}

PATHS: dict[str, Any] = {
    "/v1/authorize": {
        "post": _op(
            "Is the actor allowed to do the action on the resource?",
            "decide",
            {
                **_ref("Check"),
                "properties": {"at_least": _AT_LEAST, "explain": _BOOL},
            },
            _obj(
                ["allowed", "decision_id"],
                allowed=_BOOL,
                explanation={"type": "object"},
                **_DECISION,
            ),
        )
    },
    "/v1/authorize/batch": {
        "post": _op(
            "Many checks in one request (at most 1000)",
            "decide",
            _obj(
                ["checks"],
                checks={"type": "array", "items": _ref("Check")},
                context=_CTX,
                at_least=_AT_LEAST,
            ),
            _obj(["results"], results=_ARRAY, sequence=_INT),
        )
    },
    "/v1/list": {
        "post": _op(
            "Ids of the resources of a type the actor may act on (paginated)",
            "decide",
            _obj(
                ["actor", "action", "resource_type"],
                actor=_ref("Entity"),
                action=_STR,
                resource_type=_STR,
                context=_CTX,
                limit=_INT,
                cursor=_STR,
                at_least=_AT_LEAST,
            ),
            _obj(["ids", "next_cursor"], ids=_ARRAY, next_cursor=_STR, **_DECISION),
        )
    },
    "/v1/actions": {
        "post": _op(
            "Every action the actor may take on the resource",
            "decide",
            _obj(
                ["actor", "resource"],
                actor=_ref("Entity"),
                resource=_ref("Entity"),
                context=_CTX,
                at_least=_AT_LEAST,
            ),
            _obj(["actions"], actions=_ARRAY, **_DECISION),
        )
    },
    "/v1/query": {
        "post": _op(
            'Solutions of a predicate; an argument {"var": "x"} is unbound',
            "decide",
            _obj(["predicate"], predicate=_STR, args=_ARRAY, context=_CTX, at_least=_AT_LEAST),
            _obj(["results"], results=_ARRAY, **_DECISION),
        )
    },
    "/v1/decisions/{decision_id}": {
        "get": _op("A recent decision of this server process", "decide")
    },
    "/v1/decisions/{decision_id}/explanation": {
        "get": _op("Why an authorize decision came out as it did", "decide")
    },
    "/v1/facts": {
        "get": _op(
            "Stored facts matching a pattern, a page at a time",
            "facts:read",
            params=[
                _q("pattern", _STR, "a Pattern as JSON"),
                _q("limit", _INT, "page size, 1..1000 (default 100)"),
                _q("cursor", _STR, "next_cursor of the previous page"),
            ],
        ),
        "post": _op(
            "Insert facts",
            "facts:write",
            _obj(["facts"], facts={"type": "array", "items": _ref("Fact")}, expires_at=_NUM),
            _ref("Write"),
        ),
    },
    "/v1/facts/delete": {
        "post": _op(
            "Delete every fact matching any pattern",
            "facts:write",
            _obj(["patterns"], patterns={"type": "array", "items": _ref("Pattern")}),
            _ref("Write"),
        )
    },
    "/v1/facts/batch": {
        "post": _op(
            "Deletes then inserts, all or nothing",
            "facts:write",
            _obj(
                [],
                insert={"type": "array", "items": _ref("Fact")},
                delete={"type": "array", "items": _ref("Pattern")},
            ),
            _ref("Write"),
        )
    },
    "/v1/facts/import": {
        "post": _op(
            "Bulk import, one Fact per line; one transaction",
            "facts:write",
            _STR,
            _ref("Write"),
            content_type="application/x-ndjson",
        )
    },
    "/v1/facts/export": {
        "get": _op(
            "Every live fact, one per line",
            "facts:read",
            content_type="application/x-ndjson",
        )
    },
    "/v1/policy": {
        "get": _op("The policy in force", "policy:read"),
        "put": _op(
            "Validate and swap in a new policy; the old one stays if it fails",
            "policy:write",
            _obj(["text"], text=_STR, source=_STR, note=_STR),
            _obj(["version", "sequence"], version=_INT, sequence=_INT, warnings=_ARRAY),
        ),
    },
    "/v1/policy/validate": {
        "post": _op(
            "Check a policy without applying it",
            "policy:read",
            _obj(["text"], text=_STR, source=_STR),
            _obj(["valid"], valid=_BOOL, warnings=_ARRAY),
        )
    },
    "/v1/policy/versions": {"get": _op("Every stored policy version", "policy:read")},
    "/v1/policy/rollback": {
        "post": _op(
            "Put an earlier version back in force (as a new version)",
            "policy:write",
            _obj(["version"], version=_INT),
        )
    },
    "/v1/keys": {
        "get": _op("API keys (never the keys themselves)", "admin"),
        "post": _op(
            "Create an API key; the response is the only time it is shown",
            "admin",
            _obj(["name", "scopes"], name=_STR, scopes=_ARRAY, expires_in=_NUM),
        ),
    },
    "/v1/keys/{key_id}": {"delete": _op("Revoke a key", "admin")},
    "/v1/openapi.json": {"get": _op("This document", None)},
    "/healthz": {"get": _op("The process is alive", None)},
    "/readyz": {
        "get": {
            **_op("Facts are loaded, the change log is followed, the facts are current", None),
            "responses": {
                "200": {"description": "ready", "content": {"application/json": {"schema": {}}}},
                "503": {
                    "description": "not ready; `reason` says why",
                    "content": {"application/json": {"schema": {}}},
                },
            },
        }
    },
    "/metrics": {"get": _op("Prometheus metrics", None, content_type="text/plain")},
}


@cache
def openapi_document() -> dict:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "bastion decision service",
            "version": "1",
            "description": "Policy decisions, facts, policy versions and API keys.",
        },
        "paths": PATHS,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        },
    }
