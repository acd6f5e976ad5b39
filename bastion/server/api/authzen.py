"""AuthZEN Authorization API 1.0 routes: PDP metadata, Access Evaluation(s), and the Subject,
Resource and Action Search APIs (the protocol itself is `bastion.pdp.authzen`).

An API key with the scope ``authzen`` is needed (metadata excepted). Errors are the spec's: the
status (400 malformed, 401 no or bad key, 403 a key without the scope, 422 a search the policy
cannot answer, 500, and 503 while this replica cannot decide) with an error message string as
the body. ``X-Request-ID`` is echoed on every answer (`EchoRequestId`), those made before the
route (a body refused by its limit, a method the endpoint does not take) and a 500 included.
A single evaluation is decided on the event loop, bounded by one evaluation budget as a `/v1`
decision is; a batch and a search (more work, one budget too) run in a worker thread.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion.db import DatabaseUnavailable
from bastion.http_fields import media_type
from bastion.pdp import authzen
from bastion.policy.errors import EvaluationLimit, PolicyError
from bastion.route_paths import route_path
from bastion.server.api.decisions import (
    AUTHZEN,
    fresh,
    keep_context,
    observe_decision,
    record_decision,
)
from bastion.server.auth import require
from bastion.server.config import ServerConfig
from bastion.server.keys import ApiKey
from bastion.server.problems import NOT_A_PAGE, Problem, read_json

SCOPE = "authzen"
PREFIX = "/access/v1/"
METADATA_PATH = "/.well-known/authzen-configuration"
REQUEST_ID = b"x-request-id"
Handler = Callable[[Request], Awaitable[Response]]


def serves(path: str) -> bool:
    """Whether ``path`` (below the root path) is AuthZEN's: its answers, errors included, are
    in AuthZEN's form."""
    return path.startswith((PREFIX, METADATA_PATH))


def error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """An AuthZEN error: the status, and an error message string (spec, "Error Responses").
    It quotes what it was sent (a path a link named, a value), so it is never sniffed as a
    page (`NOT_A_PAGE`), as no other route family's error is."""
    return PlainTextResponse(message, status_code=status, headers={**NOT_A_PAGE, **(headers or {})})


def request_id(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The PEP's request identifier (spec, "Request Identification"), as it was sent."""
    for name, value in headers:
        if name == REQUEST_ID:
            return value
    return None


def failure(request: Request, message: str) -> Response:
    """The 500 of an unexpected exception on an AuthZEN path. It is answered by Starlette's
    outermost middleware, outside `EchoRequestId`, so the identifier is echoed here."""
    response = error(500, message)
    echoed = request_id(request.scope["headers"])
    if echoed is not None:
        response.raw_headers.append((REQUEST_ID, echoed))
    return response


class EchoRequestId:
    """ASGI middleware: every answer on an AuthZEN path carries the ``X-Request-ID`` the PEP
    sent (the spec's MUST), whoever made it: the route, the body limits, or the router. One
    prefix test on any other path."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        echoed = request_id(scope["headers"]) if serves(route_path(scope)) else None
        if echoed is None:
            await self.app(scope, receive, send)
            return

        async def send_echoed(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", ()), (REQUEST_ID, echoed)]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_echoed)


def _route(handler: Handler) -> Handler:
    """``handler`` with AuthZEN's error form (`EchoRequestId` echoes the request identifier)."""

    async def route(request: Request) -> Response:
        try:
            response = await handler(request)
        except Problem as p:
            headers = {"WWW-Authenticate": 'Bearer realm="bastion"'} if p.status == 401 else None
            response = error(p.status, p.detail, headers)
        except authzen.AuthzenError as e:
            response = error(e.status, str(e))
        except DatabaseUnavailable as e:
            response = error(503, f"the database is unavailable, retry: {e}", {"Retry-After": "1"})
        except PolicyError as e:
            # A question the policy in force cannot answer (a subject search over rules that
            # bind no subject): well formed, and asking again cannot help, so not a 500 (which
            # a PEP retries); 422 with the diagnostic, as `/v1/query` answers the same question.
            response = error(422, f"the policy in force cannot answer this search: {e}")
        return response

    return route


async def _body(request: Request) -> tuple[ApiKey, dict]:
    """The caller's key (scope ``authzen``), then the body: a JSON object sent as JSON, each of
    its objects naming a member once (spec §11.5, I-JSON): a body a proxy or a log reads as one
    question and bastion as another is refused, not decided."""
    key = await require(request, SCOPE)
    content_type = request.headers.get("content-type", "")
    media = media_type(content_type)
    if media != "application/json":
        raise authzen.AuthzenError(
            f"send the body as Content-Type: application/json (got {content_type[:100] or 'none'!r})"
        )
    return key, await read_json(request)


def _config(request: Request) -> ServerConfig:
    return request.app.state.config


def _log(
    request: Request,
    key: ApiKey,
    question: authzen.Evaluation,
    reply: dict,
    decision,
    pending: list[tuple] | None = None,
) -> str:
    """Keep the decision for `/v1/decisions/{id}` (and its explanation), for ``key`` (and
    admin keys) to read; return its id. ``pending``: a batch's (`DecisionLog.record`)."""
    req = question.request_json()
    keep_context(request, req, question.context)
    refusal = (
        {"reason": decision.reason, "limit": decision.limit}
        if decision is not None and decision.reason == EvaluationLimit.reason
        else None
    )
    return record_decision(
        request,
        key,
        "authorize",
        req,
        reply["decision"],
        refusal=refusal,
        api=AUTHZEN,
        pending=pending,
    )


# -- routes ------------------------------------------------------------------------------------


async def configuration(request: Request) -> Response:
    """PDP metadata: public, as discovery documents are, and served only where the spec derives
    it from the PDP's identifier (the well-known segment between its host and its path), since
    a PEP must not use a document whose identifier is not the one it asked about."""
    base = (_config(request).public_url or str(request.base_url)).rstrip("/")
    here = METADATA_PATH + urlsplit(base).path
    tail = request.path_params.get("tail")
    if (METADATA_PATH if tail is None else f"{METADATA_PATH}/{tail}") != here:
        raise Problem(404, "Not found", f"this PDP's metadata is at {here}")
    return JSONResponse(authzen.metadata(base), headers={"Cache-Control": "max-age=300"})


async def evaluation(request: Request) -> Response:
    key, body = await _body(request)
    return await _evaluate(request, key, body)


async def _evaluate(request: Request, key: ApiKey, body: dict) -> Response:
    question = authzen.read_evaluation(body)
    replica = await fresh(request, body)
    started = time.perf_counter()
    reply, decision = authzen.decide(replica.authz, question, replica.suspensions.holds)
    observe_decision(request, "authorize", started, "allow" if reply["decision"] else "deny")
    decision_id = _log(request, key, question, reply, decision)
    return JSONResponse(reply, headers={"X-Bastion-Decision-Id": decision_id})


async def evaluations(request: Request) -> Response:
    key, body = await _body(request)
    batch = authzen.read_batch(body, _config(request).authzen_max_evaluations)
    if batch is None:  # no evaluations: an Access Evaluation request, as the spec says
        return await _evaluate(request, key, body)
    replica = await fresh(request, body)
    started = time.perf_counter()
    answered = await anyio.to_thread.run_sync(
        authzen.decide_batch, replica.authz, batch, replica.suspensions.holds
    )
    each = (time.perf_counter() - started) / len(answered)
    ids, pending = [], []
    try:
        for item, (reply, decision) in zip(batch.items, answered, strict=False):
            result = "allow" if reply["decision"] else "deny"
            request.app.state.metrics.decision("authorize", result, each)
            if isinstance(item, authzen.Evaluation):
                ids.append(_log(request, key, item, reply, decision, pending))
    finally:
        # Journalled in one write, before the answer leaves (`DecisionLog.keep`).
        request.app.state.decisions.keep(pending)
    # The ids are kept one after the other, with no wait between them, so they are one range
    # of this process's log; as a list, 1,000 ids overflowed a proxy's buffer for the head.
    headers = {"X-Bastion-Decision-Ids": f"{ids[0]}..{ids[-1]}"} if ids else None
    return JSONResponse({"evaluations": [reply for reply, _ in answered]}, headers=headers)


def _search(kind: str) -> Handler:
    async def search(request: Request) -> Response:
        _, body = await _body(request)
        question = authzen.read_search(body, kind, _config(request).authzen_max_page)
        replica = await fresh(request, body)
        started = time.perf_counter()
        try:
            reply = await anyio.to_thread.run_sync(
                authzen.search, replica.authz, question, replica.suspensions.holds
            )
        except EvaluationLimit as over:
            # Refused, never an error: no results, and why (as /v1/list).
            reply = {
                "page": {"next_token": "", "count": 0, "total": 0},
                "context": {"reason": over.reason, "limit": over.limit},
                "results": [],
            }
        metric = {"subject": "subjects", "resource": "list", "action": "actions"}[kind]
        observe_decision(request, metric, started, "allow" if reply["results"] else "deny")
        return JSONResponse(reply)

    return search


routes = [
    Route(METADATA_PATH, _route(configuration), methods=["GET"]),
    # The tail is a PDP identifier's path (public_url's), if it has one.
    Route(METADATA_PATH + "/{tail:path}", _route(configuration), methods=["GET"]),
    Route(f"{PREFIX}evaluation", _route(evaluation), methods=["POST"]),
    Route(f"{PREFIX}evaluations", _route(evaluations), methods=["POST"]),
    *(
        Route(f"{PREFIX}search/{kind}", _route(_search(kind)), methods=["POST"])
        for kind in authzen.SEARCHES
    ),
]
