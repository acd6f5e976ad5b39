"""HTTP problem details (RFC 9457): every 4xx/5xx of the API says what went wrong and what to fix."""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse

from bastion import untrusted_json
from bastion.facts.model import Entity, FactError
from bastion.facts.store import (
    MAX_ENTITY_ID,
    MAX_ENTITY_TYPE,
    MAX_STRING,
    check_entity_size,
    check_string_size,
)
from bastion.http_fields import is_json_media
from bastion.whole_numbers import count_in

PROBLEM_JSON = "application/problem+json"
# On every error answer: a browser shown one (a 404 quoting the path it was sent to, say) takes
# it as the JSON it says it is, never as a page.
NOT_A_PAGE = {"X-Content-Type-Options": "nosniff"}
# What a listing returns at most when its request gives no ``limit``.
DEFAULT_LIMIT = 100


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
        headers = {**NOT_A_PAGE, "WWW-Authenticate": "Bearer"} if self.status == 401 else NOT_A_PAGE
        return JSONResponse(body, status_code=self.status, media_type=PROBLEM_JSON, headers=headers)


def bad_request(detail: str, **extra: Any) -> Problem:
    return Problem(400, "Bad request", detail, **extra)


def unprocessable(detail: str, **extra: Any) -> Problem:
    return Problem(422, "Unprocessable content", detail, **extra)


def page_limit(request: Request, most: int) -> int:
    """The ``limit`` query parameter of a listing: a whole number from 1 to ``most``."""
    text = request.query_params.get("limit")
    if text is None:
        return DEFAULT_LIMIT
    value = count_in(text, most)
    if value is None:
        raise bad_request(f"limit must be a whole number from 1 to {most}, got {text[:40]!r}")
    return value


async def problem_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Problem)
    return exc.response()


async def read_body(request: Request) -> bytes:
    """The request body; its size and deadline are enforced while it arrives by
    `bastion.server.request_limits.RequestBodyLimits`, before any of it is kept here."""
    return await request.body()


async def read_json(request: Request) -> dict:
    """The body as a JSON object; anything else (or JSON past a limit) is a 400 that says so.
    A body declared as anything but JSON (a form, text) is a 415, unread: what a browser may
    send another site without asking (a form post) is never taken for the API's JSON. A body
    sent without a Content-Type is read as JSON. An object that names a member twice is a 400
    too (`parse_json`)."""
    for content_type in request.headers.getlist("content-type"):
        if not is_json_media(content_type):
            raise Problem(
                415,
                "Unsupported media type",
                "send the body as JSON, with Content-Type: application/json (got"
                f" {content_type[:100]!r})",
            )
    body = await read_body(request)
    request.state.body_size = len(body)
    if not body:
        raise bad_request("the body must be a JSON object")
    value = parse_json(body, request.app.state.config.max_json_depth)
    if not isinstance(value, dict):
        raise bad_request("the body must be a JSON object")
    return value


def parse_json(data: bytes | str, max_depth: int, where: str = "the body") -> Any:
    """``data`` as JSON for the API: a refusal (not JSON, too deep, a number out of range, a
    name twice in one object) is a 400 that names the field and the limit. A name given twice
    is refused rather than read as its last value (I-JSON, RFC 7493 §2.3): a body built by
    pasting text (``'{"actor": "' + name + '", ...}'``) cannot have a second ``actor`` slipped
    in that overrides the first, and a proxy that reads the first value sees no other request
    than bastion decides."""
    try:
        return untrusted_json.loads(data, max_depth=max_depth, unique_keys=True)
    except untrusted_json.JsonRefused as e:
        if e.path:
            raise bad_request(f"{where}: the field {e.path!r}: {e.reason}") from None
        raise bad_request(f"{where}: {e.reason}") from None


def refusal(status: int, detail: str) -> tuple[str, bytes]:
    """A refused request (`bastion.server.request_limits`) as problem details."""
    title = _TITLES.get(status, "Refused")
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    return PROBLEM_JSON, json.dumps(body).encode()


_TITLES = {
    400: "Bad request",
    408: "Request timeout",
    413: "Content too large",
    415: "Unsupported media type",
    421: "Misdirected request",
    500: "Internal server error",
}


# -- typed fields ------------------------------------------------------------------------------


def field(body: dict, name: str, kind: type | tuple[type, ...], *, required: bool = True) -> Any:
    """``body[name]`` checked against ``kind``; a missing or mistyped field is a 400."""
    if name not in body or body[name] is None:
        if required:
            raise bad_request(f"the field {name!r} is required")
        return None
    value = body[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if value.__class__ is float and int in kinds and float not in kinds and value.is_integer():
        # JSON has one kind of number: 3.0 is the integer 3 (as JSON Schema says).
        value = int(value)
    if isinstance(value, bool) and bool not in kinds:
        raise bad_request(
            f"the field {name!r} must be {_names(kinds)}, got {untrusted_json.quoted(value)}"
        )
    if not isinstance(value, kinds):
        raise bad_request(
            f"the field {name!r} must be {_names(kinds)}, got {untrusted_json.quoted(value)}"
        )
    return value


def _names(kinds: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", bool: "a boolean", dict: "an object"}
    names |= {list: "an array", float: "a number"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


# The short form of an entity, "Type:id": a type without ":", then an id (anything, not empty).
# The OpenAPI document's pattern is this one.
ENTITY_SHORT_FORM = re.compile(r"([^:]+):([\s\S]+)")


def entity(body: dict, name: str) -> Entity:
    """An entity field: ``{"type": "User", "id": "alice"}`` or the short form ``"User:alice"``;
    a 400 for one that no fact can hold (`check_entity_size`)."""
    value = body.get(name)
    # The common, well-formed case first: it is on the path of every decision.
    if value.__class__ is dict and len(value) == 2:
        type_, id_ = value.get("type"), value.get("id")
        if (
            type_.__class__ is str
            and id_.__class__ is str
            and type_
            and len(type_) <= MAX_ENTITY_TYPE
            and len(id_) <= MAX_ENTITY_ID
        ):
            return Entity(type_, id_)
    return sized(_entity(body, name), name)


# An entity, or a string such as an action: what `sized` bounds.
_Sized = TypeVar("_Sized", Entity, str)


def sized(value: _Sized, name: str) -> _Sized:
    """``value`` (an entity, or a string such as an action), the field ``name``; a 400 if no
    fact can hold it (`check_entity_size`, `check_string_size`)."""
    try:
        if value.__class__ is Entity:
            check_entity_size(value.type, value.id)
        else:
            check_string_size(value, "a string")
    except FactError as err:
        raise bad_request(f"the field {name!r}: {err}") from None
    return value


def action(body: dict, name: str = "action") -> str:
    """An action field (a string); a 400 if it is longer than any fact can hold."""
    value = body.get(name)
    if value.__class__ is str and len(value) <= MAX_STRING:  # on the path of every decision
        return value
    return sized(field(body, name, str), name)


def entity_type(body: dict, name: str) -> str:
    """An entity type field (a string); a 400 if no fact can hold an entity of it."""
    value = field(body, name, str)
    try:
        check_entity_size(value)
    except FactError as err:
        raise bad_request(f"the field {name!r}: {err}") from None
    return value


def _entity(body: dict, name: str) -> Entity:
    value = field(body, name, (dict, str))
    if isinstance(value, str):
        short = ENTITY_SHORT_FORM.fullmatch(value)
        if short is None:
            raise bad_request(
                f"the field {name!r}: {untrusted_json.quoted(value)} is not an entity: Type:id, or"
                ' {"type": "Type", "id": "id"}'
            )
        return Entity(short[1], short[2])
    if set(value) != {"type", "id"} or not all(isinstance(v, str) for v in value.values()):
        got = untrusted_json.quoted(value)
        raise bad_request(f'the field {name!r} must be {{"type": str, "id": str}}, got {got}')
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
