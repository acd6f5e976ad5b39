"""HTTP problem details (RFC 9457): every 4xx/5xx of the API says what went wrong and what to fix."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from bastion.facts.model import Entity, FactError

PROBLEM_JSON = "application/problem+json"


class Problem(Exception):
    """Raised by a handler; becomes an ``application/problem+json`` response."""

    def __init__(self, status: int, title: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.extra = extra

    def response(self) -> JSONResponse:
        body = {"type": "about:blank", "title": self.title, "status": self.status}
        body["detail"] = self.detail
        body.update(self.extra)
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(body, status_code=self.status, media_type=PROBLEM_JSON, headers=headers)


def bad_request(detail: str, **extra: Any) -> Problem:
    return Problem(400, "Bad request", detail, **extra)


def unprocessable(detail: str, **extra: Any) -> Problem:
    return Problem(422, "Unprocessable content", detail, **extra)


async def problem_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Problem)
    return exc.response()


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (announced or actually sent)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Problem(413, "Content too large", f"the body is larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Problem(413, "Content too large", f"the body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request) -> dict:
    """The body as a JSON object; anything else is a 400 that says so."""
    body = await read_body(request, request.app.state.config.max_body_bytes)
    request.state.body_size = len(body)
    try:
        value = json.loads(body or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_request(f"the body is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise bad_request("the body must be a JSON object")
    return value


# -- typed fields ------------------------------------------------------------------------------


def field(body: dict, name: str, kind: type | tuple[type, ...], *, required: bool = True) -> Any:
    """``body[name]`` checked against ``kind``; a missing or mistyped field is a 400."""
    if name not in body or body[name] is None:
        if required:
            raise bad_request(f"the field {name!r} is required")
        return None
    value = body[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise bad_request(f"the field {name!r} must be {_names(kinds)}, got {json.dumps(value)}")
    if not isinstance(value, kinds):
        raise bad_request(f"the field {name!r} must be {_names(kinds)}, got {json.dumps(value)}")
    return value


def _names(kinds: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", bool: "a boolean", dict: "an object"}
    names |= {list: "an array", float: "a number"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def entity(body: dict, name: str) -> Entity:
    """An entity field: ``{"type": "User", "id": "alice"}`` or the short form ``"User:alice"``."""
    value = body.get(name)
    # The common, well-formed case first: it is on the path of every decision.
    if value.__class__ is dict and len(value) == 2:
        type_, id_ = value.get("type"), value.get("id")
        if type_.__class__ is str and id_.__class__ is str and type_:
            return Entity(type_, id_)
    value = field(body, name, (dict, str))
    if isinstance(value, str):
        try:
            return Entity.parse(value)
        except ValueError as e:
            raise bad_request(f"the field {name!r}: {e}") from None
    if set(value) != {"type", "id"} or not all(isinstance(v, str) for v in value.values()):
        raise bad_request(f'the field {name!r} must be {{"type": str, "id": str}}, got {value!r}')
    if not value["type"]:
        raise bad_request(f"the field {name!r} needs a non-empty type")
    return Entity(value["type"], value["id"])


def fact_problem(e: FactError, index: int | None = None, what: str = "fact") -> Problem:
    if index is None:
        where = ""
    elif what == "line":
        where = f"line {index}: "
    else:
        where = f"{what}s[{index}]: "
    return unprocessable(f"{where}{e}")
