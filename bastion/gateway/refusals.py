"""Refusals of a client's MCP request that no decision record holds: a malformed message or
params, an unknown session, a forged or foreign ``requestState``, a refused resource URI spelling,
the HTTP-level refusals of any method (405, 406, 415; a GET stream or DELETE refused), and a
DPoP-bound token used without a proof of its key (RFC 9449: how a stolen token is tried).
Audited as ``mcp.refused`` events, aggregated by `bastion.audit.refusals.RefusalLog` (address,
reason, agent; windows of a minute), so that a flood writes a bounded number of rows.

An upstream's failure (its error, or its not answering) is no refusal of bastion's: where no
decision names it (a list, a method passed through), it is relayed and logged, not audited.

Asked only on the error path: an allowed call never comes here.
"""

from __future__ import annotations

import logging
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
}
# Refusals of the HTTP request itself, by their status: these come before the JSON-RPC code.
HTTP_REASONS = {
    405: "method_not_allowed",
    406: "not_acceptable",
    415: "unsupported_media_type",
}
# Words of the error's message kept in the row: what was refused, not what the client sent.
FIRST_WORDS = 12


class RequestRefusals:
    """Audits the refusals of clients' requests (see module); with no log, none."""

    def __init__(self, refusals: RefusalLog | None) -> None:
        self.refusals = refusals

    async def note(self, error: RpcError, caller: Caller, server: str, method: Any) -> None:
        """Audit ``error``, the answer to ``caller``'s request ``method`` to ``server``, if it
        is a refusal of the request that no decision record holds; log it if it is an
        upstream's failure that none holds. The database being down does
        not change the answer: the refusal is still sent, the count kept for later
        (`RefusalLog`), and a warning logged."""
        if isinstance(error, UpstreamFailure):
            # An upstream's failure where no decision names it (a decided call's is answered
            # as bastion's, naming it: `handlers._ended`), relayed: no refusal of bastion's.
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
