"""uvicorn's access log without the secrets a query string can carry (docs/security.md, "Secrets
in logs").

Authorization codes and their state come back to bastion's callbacks in the query (a company
OpenID provider's, an upstream's), and a client may put its access token there (RFC 6750 §2.3,
which bastion refuses, but uvicorn logs the request first). Every access log line goes through
the ``uvicorn.access`` logger, whatever path served the request: the filter there writes the value
of each such parameter as ``[redacted]`` (`bastion.redaction.redact_query`), its name kept.
"""

from __future__ import annotations

import logging

from bastion.redaction import redact_query


class QueryRedaction(logging.Filter):
    """On ``uvicorn.access``, whose lines are ``'%s - "%s %s HTTP/%s" %d'`` with the path and
    query third."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) > 2 and isinstance(args[2], str):
            record.args = (*args[:2], redact_query(args[2]), *args[3:])
        return True


def redact_access_log() -> None:
    """Install the filter once on uvicorn's access logger (it outlives uvicorn's dictConfig)."""
    logger = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, QueryRedaction) for f in logger.filters):
        logger.addFilter(QueryRedaction())
