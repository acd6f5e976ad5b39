"""Decisions answered inside the HTTP protocol, without the ASGI application, when all they need
is in memory.

A single check through uvicorn's ASGI cycle, Starlette's middleware and its Request and Response
costs tens of times the decision itself. ``POST /v1/authorize`` and ``/v1/authorize/batch`` are
answered here, from `bastion.server.connections.BoundedHttpProtocol`, when the request is framed
simply (HTTP/1.1, one Content-Length within the body limit), its key was verified within the key
cache's lifetime and grants ``decide``, its body is JSON that passes the route's checks, and the
replica can answer now (not stale, ``at_least`` already applied). The answer is made by the
routes' own functions (`bastion.server.api.decisions`): decided, counted and recorded as through
the application.

Anything else goes to the application unchanged, which answers it as it always has: a key to
look up or refuse, a body that is refused or sent chunked, a wait for ``at_least``, stale
facts, a connection with an answer still under way, HTTP/1.0, an access log to write. Nothing is
answered here that the application would refuse: a request that does not check out here is
handed over before anything is decided or recorded.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bastion.http_fields import is_json_media
from bastion.server.api.decisions import (
    EXPLAIN_SCOPE,
    Asked,
    answerable_now,
    authorize_answer,
    authorize_batch_answer,
)
from bastion.server.problems import Problem, parse_json
from bastion.server.request_limits import BodyLimit
from bastion.whole_numbers import capped

log = logging.getLogger("bastion.server")

# Headers after which a body is not one plain Content-Length the protocol can hold.
_UNFRAMED = frozenset({b"transfer-encoding", b"expect", b"upgrade"})

# (what was asked, body, replica) -> the answer's JSON; raises `Problem` before deciding
# anything.
Answer = Callable[[Asked, dict, Any], dict]

SCOPE = "decide"
# JSON as Starlette's JSONResponse renders it, with one encoder made once.
_render = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode


@dataclass(frozen=True, slots=True)
class DirectRoute:
    """A route answered in the protocol: how, and the body limit of its path."""

    answer: Answer
    limit: BodyLimit


class DirectDecisions:
    """The decision routes answered in the protocol, for one application."""

    def __init__(self, app: Any) -> None:
        self.app = app
        state = app.state
        self.keys = state.keys
        self.replica = state.replica
        self.metrics = state.metrics
        self.log = state.decisions
        self.max_json_depth = state.config.max_json_depth
        self.body_timeout = state.config.body_timeout
        limits = state.body_limits
        # The exact request targets (of a POST): a query string, or any other spelling, goes the
        # long way.
        self.routes: dict[bytes, DirectRoute] = {
            path.encode(): DirectRoute(answer, limits.for_path(path))
            for path, answer in (
                ("/v1/authorize", authorize_answer),
                ("/v1/authorize/batch", authorize_batch_answer),
            )
        }

    @staticmethod
    def framed(headers: list[tuple[bytes, bytes]], names: list[bytes], max_bytes: int) -> bool:
        """Whether the head (its names lowercased, and those ``names`` in order) frames a body
        this path can take in one piece: one plain Content-Length within the limit, nothing
        chunked, nothing that waits for 100 Continue."""
        if names.count(b"content-length") != 1 or not _UNFRAMED.isdisjoint(names):
            return False
        length = headers[names.index(b"content-length")][1]
        declared = capped(length.decode("latin-1"), max_bytes)
        return declared is not None and declared <= max_bytes

    def answer(
        self, route: DirectRoute, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> bytes | None:
        """The JSON answer, decided and recorded; None (nothing decided, nothing recorded) when
        the application must answer instead: also for a body declared as anything but JSON,
        which the application refuses (`bastion.server.problems.read_json`)."""
        authorization = None
        for name, value in headers:
            if name == b"authorization":
                if authorization is not None:
                    return None  # two: the application refuses them (`bastion.server.auth`)
                authorization = value
            elif (
                name == b"content-type"
                and value != b"application/json"  # what clients send, compared at once
                and not is_json_media(value.decode("latin-1"))
            ):
                return None
        if authorization is None:
            return None
        kind, _, token = authorization.decode("latin-1").partition(" ")
        token = token.strip()
        if kind.lower() != "bearer" or not token:
            return None
        known, key = self.keys.remembered(token)
        if not known or key is None or not key.allows(SCOPE):
            return None
        replica = self.replica
        try:
            parsed = parse_json(body, self.max_json_depth) if body else None
            if parsed.__class__ is not dict or not answerable_now(replica, parsed):
                return None
            asked = Asked(self.log, self.metrics, len(body), key.id, key.allows(EXPLAIN_SCOPE))
            out = route.answer(asked, parsed, replica)
        except Problem:
            return None
        except Exception:
            # The application meets the same failure and answers it (a 500 that names no
            # internals, logged with its traceback).
            log.exception("a decision answered in the protocol failed; the application answers")
            return None
        self.metrics.direct_answer()
        return _render(out).encode()
