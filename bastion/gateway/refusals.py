"""Refusals of a client's MCP request that no decision record holds: a malformed message or
params, an unknown session, a forged or foreign ``requestState``, a refused resource URI spelling,
the HTTP-level refusals of any method (405, 406, 415; a GET stream or DELETE refused), and a
DPoP-bound token used without a proof of its key (RFC 9449: how a stolen token is tried).
Audited as ``mcp.refused`` events, aggregated by `bastion.audit.refusals.RefusalLog` (address,
reason, agent; windows of a minute), so that a flood writes a bounded number of rows.

An upstream's failure (its error, or its not answering) is no refusal of bastion's: where no
decision names it (a list, a method passed through), it is relayed and logged, not audited; the
log lines are aggregated as the refusals are (`UpstreamErrorLog`), since a client can make an
upstream fail as often as it asks.

Asked only on the error path: an allowed call never comes here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio

from bastion.audit.refusals import RefusalLog
from bastion.gateway.enforce import Caller
from bastion.gateway.jsonrpc import (
    HEADER_MISMATCH,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    RATE_LIMIT_UNAVAILABLE,
    SESSION_NOT_FOUND,
    UNSUPPORTED_PROTOCOL_VERSION,
    RpcError,
)
from bastion.gateway.upstream import UpstreamFailure

log = logging.getLogger("bastion.gateway")

KIND = "mcp.refused"
# The JSON-RPC errors that refuse a client's own request before any decision, by the reason
# their rows give: a small fixed set, since the reason keys the aggregation. The others (a
# policy's refusal, an upstream that is down, bastion's own failure) are recorded elsewhere or
# are no refusal of the request.
REASONS = {
    PARSE_ERROR: "parse_error",
    INVALID_REQUEST: "invalid_request",
    METHOD_NOT_FOUND: "method_not_found",
    INVALID_PARAMS: "invalid_params",
    SESSION_NOT_FOUND: "session_not_found",
    HEADER_MISMATCH: "header_mismatch",
    UNSUPPORTED_PROTOCOL_VERSION: "unsupported_protocol_version",
    # With no decision named: a listen stream's follows that Redis cannot count
    # (`bastion.gateway.follows.follows_unavailable`; a decided one names its decision).
    RATE_LIMIT_UNAVAILABLE: "subscriptions_unavailable",
}
# Refusals of the HTTP request itself, by their status: these come before the JSON-RPC code.
HTTP_REASONS = {
    405: "method_not_allowed",
    406: "not_acceptable",
    415: "unsupported_media_type",
}
# Words of the error's message kept in the row: what was refused, not what the client sent.
FIRST_WORDS = 12
# Past max_keys, an upstream's further errors are counted per server under this key.
OVERFLOW = "*"


@dataclass
class _Window:
    opened_at: float
    last_at: float
    repeats: int = 0


class UpstreamErrorLog:
    """An upstream's errors on requests no decision names, logged in bounded volume: per server,
    method, user, agent and code, the first of a window of ``window_seconds`` is logged at once
    (with the first words of its message), the ones after it only counted, and their count logged
    in one more line once the window has closed (`sweep`: on the next error and every 0.2 s
    while decision records are kept, at most once a second; at shutdown, every window). At most ``max_keys`` keys are counted at a time;
    past that, each server's further errors share one key with method, user, agent and code
    ``*``. So a window logs at most ``2 * (max_keys + servers)`` lines, whatever the flood. Only
    ever used on the event loop: no lock."""

    def __init__(
        self,
        *,
        window_seconds: float = 60.0,
        max_keys: int = 1000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window_seconds = window_seconds
        self.max_keys = max_keys
        self.clock = clock
        self._windows: dict[tuple, _Window] = {}
        self._next_sweep = 0.0

    def note(self, error: UpstreamFailure, caller: Caller, server: str, method: Any) -> None:
        self.sweep()
        now = self.clock()
        key = (server, method if isinstance(method, str) else None)
        key += (caller.subject, caller.client_id, error.code)
        window = self._windows.get(key)
        if window is not None and now - window.opened_at >= self.window_seconds:
            self._closed(key, self._windows.pop(key))
            window = None
        if window is None and len(self._windows) >= self.max_keys:
            key = (server, OVERFLOW, OVERFLOW, OVERFLOW, OVERFLOW)
            window = self._windows.get(key)
        if window is not None:
            window.repeats += 1
            window.last_at = now
            return
        self._windows[key] = _Window(opened_at=now, last_at=now)
        if key[1] == OVERFLOW:
            log.info(
                "upstream %s: more upstream errors than upstream_error_log_max_keys (%d) keys"
                " in this window: counted together, relayed",
                server,
                self.max_keys,
            )
            return
        words = error.message.split(maxsplit=FIRST_WORDS)
        log.info(
            "%s to upstream %s (user %s, agent %s): upstream error %d %r, relayed",
            method,
            server,
            caller.subject,
            caller.client_id,
            error.code,
            " ".join(words[:FIRST_WORDS]),
        )

    def sweep(self) -> None:
        """Log the counts of windows that have closed, at most once a second (or per window,
        if shorter): on each error, and from the gateway's periodic flush."""
        if self.clock() >= self._next_sweep:
            self.flush()

    def flush(self, *, everything: bool = False) -> None:
        """Log the counts of windows that have closed (of every window, with ``everything``)."""
        now = self.clock()
        self._next_sweep = now + min(self.window_seconds, 1.0)
        closed = [
            key
            for key, window in self._windows.items()
            if everything or now - window.opened_at >= self.window_seconds
        ]
        for key in closed:
            self._closed(key, self._windows.pop(key))

    def _closed(self, key: tuple, window: _Window) -> None:
        if not window.repeats:
            return
        server, method, subject, client_id, code = key
        log.info(
            "%s to upstream %s (user %s, agent %s): upstream error %s relayed %d more times"
            " in %.0f s after the first (one line per %g s window)",
            method,
            server,
            subject,
            client_id,
            code,
            window.repeats,
            window.last_at - window.opened_at,
            self.window_seconds,
        )


class RequestRefusals:
    """Audits the refusals of clients' requests (see module); with no log, none. Logs an
    upstream's failures where no decision names them, aggregated (`UpstreamErrorLog`)."""

    def __init__(
        self, refusals: RefusalLog | None, upstream_errors: UpstreamErrorLog | None = None
    ) -> None:
        self.refusals = refusals
        self.upstream_errors = upstream_errors or UpstreamErrorLog()

    async def note(self, error: RpcError, caller: Caller, server: str, method: Any) -> None:
        """Audit ``error``, the answer to ``caller``'s request ``method`` to ``server``, if it
        is a refusal of the request that no decision record holds; log it if it is an
        upstream's failure that none holds. The database being down does
        not change the answer: the refusal is still sent, the count kept for later
        (`RefusalLog`), and a warning logged."""
        if isinstance(error, UpstreamFailure):
            # An upstream's failure where no decision names it (a decided call's is answered
            # as bastion's, naming it: `handlers._ended`), relayed: no refusal of bastion's.
            self.upstream_errors.note(error, caller, server, method)
            return
        if error.data is not None and "decision_id" in error.data:
            return  # decided, and in the decision records
        reason = HTTP_REASONS.get(error.http_status) or REASONS.get(error.code)
        if reason is None or self.refusals is None:
            return
        await self.record(reason, caller, server, method, error.code, error.message)

    async def record(
        self,
        reason: str,
        caller: Caller,
        server: str,
        method: Any,
        code: int | None,
        message: str,
    ) -> None:
        """Audit a refusal of ``caller``'s request for ``reason`` (from a small fixed set: it
        keys the aggregation), with the JSON-RPC ``code`` if it has one and the first words of
        ``message``."""
        if self.refusals is None:
            return
        words = message.split(maxsplit=FIRST_WORDS)
        try:
            await anyio.to_thread.run_sync(
                partial(
                    self.refusals.record,
                    KIND,
                    address=caller.address,
                    reason=reason,
                    client_id=caller.client_id,
                    subject=caller.subject,
                    server=server,
                    method=method if isinstance(method, str) else None,
                    code=code,
                    message=" ".join(words[:FIRST_WORDS]),
                )
            )
        except Exception as e:
            log.warning("a refused MCP request could not be audited now: %s", e)
